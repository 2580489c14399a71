"""Results tables in the paper's layout: load/validate the table JSON, fill P_up/P_comp/P_1, render markdown.

The table schema is that of ``paper_table.json``: ``{"datasets": [...], "blocks": {name: {"description",
"old": {"self": [...]}, "independent": {"self": [...], "cross": [...]}, "methods": {name: {"self":
[...], "cross": [...]}}}}}`` with one mAP (%) per dataset in every list.
"""

import copy
import json
import math

from advbct.errors import UserError
from advbct.evaluation import test_sets
from advbct.evaluation.scores import independent_p_comp, summary_scores
from advbct.io import write_json_atomic, write_text_atomic

SCORE_KEYS = ("P_up", "P_comp", "P_1")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(mapping, key, path, source, expected):
    """``mapping[key]`` or a UserError naming the file and the dotted key path."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise UserError(f"{source}: missing key '{path}' ({expected})")
    return mapping[key]


def _check_values(values, path, source, n):
    if not isinstance(values, list) or len(values) != n or not all(_is_number(v) for v in values):
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise UserError(
            f"{source}: '{path}' must be a list of {n} finite numbers (one mAP per dataset in "
            f"'datasets'), got {got}: {values!r}"
        )


def validate_table(table, source="table"):
    """Raise :class:`UserError` (naming ``source`` and the key) unless ``table`` follows the schema."""
    if not isinstance(table, dict):
        raise UserError(f"{source}: expected a JSON object with keys 'datasets' and 'blocks', got {type(table).__name__}")
    datasets = _require(table, "datasets", "datasets", source, "expected a list of dataset names")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
        raise UserError(f"{source}: 'datasets' must be a non-empty list of dataset names, got {datasets!r}")
    n = len(datasets)
    blocks = _require(table, "blocks", "blocks", source, "expected an object of table blocks")
    if not isinstance(blocks, dict) or not blocks:
        raise UserError(f"{source}: 'blocks' must be a non-empty object of table blocks")
    for name, block in blocks.items():
        where = f"blocks.{name}"
        old = _require(block, "old", f"{where}.old", source, "expected the old model's results")
        _check_values(_require(old, "self", f"{where}.old.self", source, f"expected {n} self-test mAPs"),
                      f"{where}.old.self", source, n)
        ind = _require(block, "independent", f"{where}.independent", source,
                       "expected the independent model φ*'s results; P_up/P_comp/P_1 need its self-test")
        _check_values(_require(ind, "self", f"{where}.independent.self", source, f"expected {n} self-test mAPs"),
                      f"{where}.independent.self", source, n)
        if "cross" in ind:
            _check_values(ind["cross"], f"{where}.independent.cross", source, n)
        methods = block.get("methods", {})
        if not isinstance(methods, dict):
            raise UserError(f"{source}: '{where}.methods' must be an object mapping method names to results")
        for method, row in methods.items():
            for key in ("self", "cross"):
                path = f"{where}.methods.{method}.{key}"
                _check_values(_require(row, key, path, source, f"expected {n} {key}-test mAPs"), path, source, n)


def load_table(path):
    """Read and validate a table JSON file; errors name the file and the offending key."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: table file not found (expected a JSON file like paper_table.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    validate_table(table, source=str(path))
    return table


def fill_scores(table, source="table"):
    """A copy of ``table`` with P_up/P_comp/P_1 computed for every method row and P_comp for φ*."""
    validate_table(table, source)
    out = copy.deepcopy(table)
    for name, block in out["blocks"].items():
        old = block["old"]["self"]
        ind = block["independent"]
        where = f"blocks.{name}.independent"
        try:
            for method, row in block.get("methods", {}).items():
                where = f"blocks.{name}.methods.{method}"
                row.update(summary_scores(row["self"], row["cross"], old, ind["self"]))
            if "cross" in ind:
                where = f"blocks.{name}.independent"
                ind["P_comp"] = independent_p_comp(ind["cross"], old, ind["self"])
        except UserError as exc:
            raise UserError(f"{source}: '{where}': {exc}") from None
        for key in ("P_up", "P_1"):  # φ* has no P_up (it would be 50) and hence no P_1
            ind.pop(key, None)
    return out


def _fmt(x):
    return "–" if x is None else f"{x:.2f}"


def _pair(row, i, with_cross=True):
    """'self / cross' (or 'self') of dataset column ``i`` of ``row``; None when absent."""
    if row is None or i is None:
        return None
    self_ = _fmt(row["self"][i])
    if not with_cross:
        return self_
    cross = row.get("cross")
    return f"{self_} / {_fmt(cross[i])}" if cross is not None else f"{self_} / –"


def _cell(ours, paper):
    """'ours (paper)', or just ours without a paper value; a single dash when neither exists."""
    if ours is None:
        ours = "–"
    if paper is None or (paper == "–" and ours == "–"):
        return ours
    return f"{ours} ({paper})"


def _render_block(name, block, datasets, ref_block=None, ref_datasets=()):
    ref_index = [ref_datasets.index(d) if d in ref_datasets else None for d in datasets]

    def row_cells(label, row, ref_row, with_cross=True):
        cells = [label]
        for i, j in enumerate(ref_index):
            paper = _pair(ref_row, j, with_cross) if ref_row is not None else None
            cells.append(_cell(_pair(row, i, with_cross), paper))
        for key in SCORE_KEYS:
            paper = _fmt(ref_row.get(key)) if ref_row is not None else None
            cells.append(_cell(_fmt(row.get(key)), paper))
        return "| " + " | ".join(cells) + " |"

    ref_block = ref_block or {}
    title = f"### {name}" + (f" — {block['description']}" if block.get("description") else "")
    header = ["model"] + [f"{test_sets.label(d)} self / cross" for d in datasets] + list(SCORE_KEYS)
    lines = [title, ""]
    if ref_block:
        lines += ["Cells: ours (paper).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(row_cells("φ_old (self only)", block["old"], ref_block.get("old"), with_cross=False))
    lines.append(row_cells("φ* (independent)", block["independent"], ref_block.get("independent")))
    ref_methods = ref_block.get("methods", {})
    for method, row in block.get("methods", {}).items():
        lines.append(row_cells(method, row, ref_methods.get(method)))
    return "\n".join(lines)


def render_markdown(table, reference=None):
    """Markdown for every block in the paper's layout (mAP self / cross per dataset, then P columns).

    With ``reference`` (a table of the same schema, e.g. the paper's), each cell shows "ours (paper)"
    for the blocks, rows and datasets the reference has.
    """
    datasets = table["datasets"]
    ref_blocks = reference["blocks"] if reference else {}
    ref_datasets = reference["datasets"] if reference else []
    parts = [
        _render_block(name, block, datasets, ref_blocks.get(name), ref_datasets)
        for name, block in table["blocks"].items()
    ]
    return "\n\n".join(parts) + "\n"


def make_table(from_json, json_out=None, markdown_out=None, reference=None):
    """Load a results table, fill its P scores, write the optional outputs; returns the markdown."""
    table = fill_scores(load_table(from_json), source=str(from_json))
    ref = load_table(reference) if reference else None
    markdown = render_markdown(table, ref)
    if json_out:
        write_json_atomic(json_out, table)
    if markdown_out:
        write_text_atomic(markdown_out, markdown)
    return markdown
