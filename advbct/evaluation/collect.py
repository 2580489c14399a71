"""Assemble ``results.json`` files (scripts/test.sh) into one block of the paper's table schema."""

import json
import os

from advbct.errors import UserError
from advbct.evaluation import test_sets
from advbct.evaluation.protocol import headline


def read_results(path):
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: results file not found (run scripts/test.sh first)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(result, dict):
        raise UserError(f"{path}: expected a JSON object (the results.json of scripts/test.sh), got "
                        f"{type(result).__name__}")
    return result


def _row(result_dirs, datasets, keys, source):
    row = {}
    for key, name in keys:
        values = []
        for d in datasets:
            path = os.path.join(result_dirs, d, "results.json")
            try:
                h = headline(read_results(path))
            except (KeyError, TypeError) as exc:
                raise UserError(f"{path}: no headline metric ({exc})") from None
            if key not in h:
                raise UserError(f"{path}: no {key} result (was the old model given to scripts/test.sh?)")
            values.append(round(h[key], 4))
        row[name] = values
    return row


def collect_block(independent_dir, methods, datasets=None, description=""):
    """A table dict: ``old.self`` and ``independent`` from φ*'s results, one row per ``methods`` entry.

    Every directory holds ``<dataset>/results.json``; each result carries the old model's self-test.
    ``datasets`` defaults to every registered test set, in the paper's order (advbct.evaluation.test_sets).
    """
    datasets = list(test_sets.names() if datasets is None else datasets)
    block = {"description": description,
             "old": _row(independent_dir, datasets, [("old_self", "self")], "old"),
             "independent": _row(independent_dir, datasets, [("self", "self"), ("cross", "cross")], "φ*"),
             "methods": {name: _row(d, datasets, [("self", "self"), ("cross", "cross")], name)
                         for name, d in methods.items()}}
    return {"datasets": datasets, "blocks": {"block": block}}


def criterion_report(table):
    """Lines saying, per block, method and dataset, whether cross-test beats the old self-test
    (the compatibility criterion of PAPER.md); returns ``(lines, all_hold)``."""
    lines, ok = [], True
    names = table["datasets"]
    for block_name, block in table["blocks"].items():
        old = block["old"]["self"]
        for method, row in block.get("methods", {}).items():
            for d, cross, o in zip(names, row["cross"], old):
                holds = cross > o
                ok &= holds
                verdict = "compatible" if holds else "NOT compatible"
                lines.append(f"{method} on {d}: cross-test {cross:.2f} {'>' if holds else '<='} "
                             f"old self-test {o:.2f} -> {verdict}")
        ind = block["independent"]
        if "cross" in ind:
            for d, cross, o in zip(names, ind["cross"], old):
                lines.append(f"phi* on {d}: cross-test {cross:.2f} (no compatibility training; old self {o:.2f})")
    return lines, ok
