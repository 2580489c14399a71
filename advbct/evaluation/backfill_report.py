"""Partial-backfilling curves of several models: one JSON, and one PNG when matplotlib is installed."""

import glob
import os

from advbct.errors import UserError
from advbct.evaluation.collect import read_results
from advbct.io import atomic_path, write_json_atomic


def model_labels():
    """Legend label of each model folder: phi* for independent training, each registered compatibility
    method's plot label (advbct/losses/registry.py; imported here, when a report is drawn)."""
    from advbct.losses.registry import plot_labels

    return {"independent": "phi*", **plot_labels()}


def gather_curves(eval_dir):
    """``{dataset: {model: curve}}`` from ``<eval_dir>/<model>/<dataset>/results.json``; a curve holds
    "ratios", "values", "metric" and (since the unit is recorded) "unit", "seed" and, for batch, "batch"."""
    curves = {}
    for path in sorted(glob.glob(os.path.join(eval_dir, "*", "*", "results.json"))):
        model = os.path.basename(os.path.dirname(os.path.dirname(path)))
        result = read_results(path)
        if "backfill" in result:
            curves.setdefault(result["dataset"], {})[model] = result["backfill"]
    if not curves:
        raise UserError(f"{eval_dir}: no results.json with a backfilling curve (run scripts/test.sh with "
                        f"EVAL.BACKFILL true)")
    return curves


def refresh_mode(curve):
    """How a curve's refreshed rows were chosen, e.g. "batches of 16, seed 100"; None for a results.json
    written before the unit was recorded (those are image curves of an unrecorded seed)."""
    if "unit" not in curve:
        return None
    what = f"batches of {curve['batch']}" if curve["unit"] == "batch" else "images"
    return f"{what}, seed {curve['seed']}"


def _axis_and_labels(models):
    """The x-axis label and one legend label per model: a mode shared by every curve goes on the axis,
    differing modes go into the legend so that curves of different units are never taken as alike."""
    modes = {model: refresh_mode(c) for model, c in models.items()}
    xlabel = "gallery refreshed by the new model (%)"
    known = model_labels()
    labels = {model: known.get(model, model) for model in models}
    if len(set(modes.values())) == 1:
        shared = next(iter(modes.values()))
        return (xlabel + (f"\n({shared})" if shared else "")), labels
    return xlabel, {m: f"{labels[m]} ({modes[m] or 'unit not recorded'})" for m in models}


def write_backfill_report(eval_dir, out_prefix):
    """Write ``<out_prefix>.json`` always and ``<out_prefix>.png`` if matplotlib is available."""
    curves = gather_curves(eval_dir)
    write_json_atomic(out_prefix + ".json", curves)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out_prefix + ".json", None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (dataset, models) in zip(axes[0], sorted(curves.items())):
        xlabel, labels = _axis_and_labels(models)
        for model, c in sorted(models.items()):
            ax.plot([100 * r for r in c["ratios"]], c["values"], marker="o", label=labels[model])
        ax.set_title(dataset)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(next(iter(models.values()))["metric"])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(out_prefix + ".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)  # format named: the temporary file has no .png suffix
    finally:
        plt.close(fig)
    return out_prefix + ".json", out_prefix + ".png"
