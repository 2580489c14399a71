"""The compatibility matrix of a chain of model generations and its two summary scores.

C[i][j] (i >= j) is the headline metric of queries embedded by generation i against a gallery embedded by
generation j; the diagonal holds the self-tests. The scores are those of the stationary-representation
line of work (CoReS, Biondi et al., TPAMI 2023; "Stationary Representations", CVPR 2024):

* AC, the empirical compatibility criterion over the whole chain: the share of pairs i > j whose cross
  test beats the self-test of the older model, C[i][j] > C[j][j] (a tie is not compatible);
  AC = 2 / (T (T - 1)) * sum_{i > j} 1[C[i][j] > C[j][j]].
* AM, the mean of the lower triangle with the diagonal: AM = 2 / (T (T + 1)) * sum_{i >= j} C[i][j].
"""

from __future__ import annotations

import numpy as np

from advbct.errors import UserError

__all__ = ["ac_score", "am_score", "check_matrix", "matrix_markdown", "write_heatmap"]


def check_matrix(matrix) -> np.ndarray:
    """``matrix`` as a (T, T) float array with T >= 2 and a finite lower triangle (the upper one is unused)."""
    c = np.asarray([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise UserError(f"compatibility matrix: expected a square matrix of at least 2 generations, got shape "
                        f"{c.shape}")
    if not np.isfinite(c[np.tril_indices(len(c))]).all():
        raise UserError("compatibility matrix: its lower triangle (with the diagonal) must be finite numbers")
    return c


def _compatible(c) -> np.ndarray:
    """Per pair i > j (row-major order of the strict lower triangle): C[i][j] > C[j][j]."""
    i, j = np.tril_indices(len(c), k=-1)
    return c[i, j] > c[j, j]


def ac_score(matrix) -> float:
    """AC in [0, 1]: the share of the pairs i > j with C[i][j] > C[j][j]."""
    return float(np.mean(_compatible(check_matrix(matrix))))


def am_score(matrix) -> float:
    """AM: the mean of C[i][j] over i >= j, in the metric's units."""
    c = check_matrix(matrix)
    return float(np.mean(c[np.tril_indices(len(c))]))


def matrix_markdown(names, sets) -> str:
    """One markdown table per test set: rows the query model, columns the gallery model, then AC and AM.

    ``names``: the generations' labels, oldest first; ``sets``: ``{test set: {"metric", "matrix", "AC", "AM"}}``."""
    lines = []
    for name, entry in sets.items():
        c = check_matrix(entry["matrix"])
        lines += [f"**{name}** ({entry['metric']}; rows: query model, columns: gallery model)", "",
                  "| query \\ gallery | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for i, row_name in enumerate(names):
            cells = [f"{c[i, j]:.2f}" if j <= i else "" for j in range(len(names))]
            lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
        lines += ["", f"AC {entry['AC']:.2f} ({_pairs(c)} pairs), AM {entry['AM']:.2f}", ""]
    return "\n".join(lines)


def _pairs(c) -> str:
    compatible = _compatible(c)
    return f"{int(compatible.sum())} of {compatible.size}"


def write_heatmap(names, sets, path, title="") -> bool:
    """The lower triangles as annotated heat maps, one panel per test set, into the PNG ``path`` (atomically);
    False (nothing written) when matplotlib is not installed."""
    from advbct.evaluation.plotting import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return False
    t = len(names)
    fig, axes = plt.subplots(1, len(sets), figsize=(1.2 + 1.1 * t * len(sets) + 0.6 * len(sets), 0.9 + 0.9 * t),
                             squeeze=False)
    for ax, (name, entry) in zip(axes[0], sets.items()):
        c = check_matrix(entry["matrix"])
        shown = np.where(np.tril(np.ones_like(c, dtype=bool)), c, np.nan)
        image = ax.imshow(shown, cmap="viridis", vmin=np.nanmin(shown), vmax=np.nanmax(shown))
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{c[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if c[i, j] < (np.nanmin(shown) + np.nanmax(shown)) / 2 else "black")
        ax.set_xticks(range(t), names)
        ax.set_yticks(range(t), names)
        ax.set_xlabel("gallery model")
        ax.set_ylabel("query model")
        ax.set_title(f"{name}\nAC {entry['AC']:.2f}, AM {entry['AM']:.1f}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=entry["metric"])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(plt, fig, path)
    return True


def read_matrix(path) -> dict:
    """A matrix.json of scripts/test_generations.sh, checked enough to summarise (one-line errors naming it)."""
    import os

    from advbct.evaluation.collect import read_results

    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (run scripts/test_generations.sh first)")
    result = read_results(path)
    sets = result.get("sets")
    gens = result.get("generations")
    if not isinstance(sets, dict) or not sets or not isinstance(gens, list):
        raise UserError(f"{path}: expected the matrix.json of scripts/test_generations.sh (with 'generations' "
                        f"and 'sets')")
    for name, entry in sets.items():
        if not isinstance(entry, dict) or not {"metric", "matrix", "AC", "AM"} <= set(entry):
            raise UserError(f"{path}: test set '{name}' lacks its metric, matrix, AC or AM")
        try:
            check_matrix(entry["matrix"])
        except (UserError, TypeError, ValueError):
            raise UserError(f"{path}: test set '{name}': its matrix is not a square lower triangle of numbers") \
                from None
    return result


def summary(methods, description="") -> dict:
    """``{"description", "methods": {label: {set: {"AC", "AM", "matrix", "metric"}}}, "generations"}`` of
    ``methods`` (``{label: matrix.json result}``), the chain the first method ran on its ``generations``."""
    out = {"description": description, "methods": {}, "generations": []}
    for label, result in methods.items():
        out["generations"] = out["generations"] or [g.get("name") for g in result["generations"]]
        out["methods"][label] = {name: {k: entry[k] for k in ("metric", "AC", "AM", "matrix")}
                                 for name, entry in result["sets"].items()}
    return out


def summary_markdown(table) -> str:
    """AC and AM of every method on every test set (rows: methods), then each method's matrices."""
    sets = list(dict.fromkeys(s for m in table["methods"].values() for s in m))
    lines = [f"### {table['description']}" if table["description"] else "### Compatibility over generations", "",
             "| method | " + " | ".join(f"{s} AC | {s} AM" for s in sets) + " |",
             "|---|" + "---:|---:|" * len(sets)]
    for label, entries in table["methods"].items():
        cells = [f"{entries[s]['AC']:.2f} | {entries[s]['AM']:.2f}" if s in entries else "- | -" for s in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "AC: share of the pairs i > j whose cross test beats the older model's self-test; AM: mean of "
              "the matrix's lower triangle with the diagonal.", ""]
    for label, entries in table["methods"].items():
        lines += [f"#### {label}", "", matrix_markdown(table["generations"], entries)]
    return "\n".join(lines)
