"""Partial-backfilling curves of several models: one JSON, and one PNG when matplotlib is installed; with
results that hold several refresh units (EVAL.BACKFILL_UNITS), also the units side by side."""

import glob
import os

from advbct.errors import UserError
from advbct.evaluation.backfill import area_under_curve
from advbct.evaluation.collect import read_results
from advbct.evaluation.plotting import pyplot, save_png
from advbct.io import write_json_atomic

# line style of each refresh unit in the units plot; a unit not listed here gets dash-dot
UNIT_STYLES = {"image": "-", "batch": "--", "most_changed": ":"}
XLABEL = "gallery refreshed by the new model (%)"


def model_labels():
    """Legend label of each model folder: phi* for independent training, each registered compatibility
    method's plot label (advbct/losses/registry.py; imported here, when a report is drawn)."""
    from advbct.losses.build import needs_transformation
    from advbct.losses.registry import plot_labels

    labels = plot_labels()
    # a mapped method's model tested through the training-free Procrustes map (the <name>_procrustes table rows)
    procrustes = {f"{name}_procrustes": f"{label} (Procrustes)" for name, label in labels.items()
                  if needs_transformation({"TYPE": name})}
    return {"independent": "phi*", **labels, **procrustes}


def read_eval_dir(eval_dir):
    """``[(path, model, result)]`` of every ``<eval_dir>/<model>/<dataset>/results.json``, in path order, each
    file read once for the report's curves of both kinds."""
    return [(path, os.path.basename(os.path.dirname(os.path.dirname(path))), read_results(path))
            for path in sorted(glob.glob(os.path.join(eval_dir, "*", "*", "results.json")))]


def gather_curves(eval_dir, results=None):
    """``{dataset: {model: curve}}`` from ``<eval_dir>/<model>/<dataset>/results.json`` (``results``: those
    files, already read by :func:`read_eval_dir`); a curve holds "ratios", "values", "metric" and (since the
    unit is recorded) "unit", "seed" and, for batch, "batch" (and, since they are recorded, "auc" and
    "negative_flip")."""
    curves = {}
    for path, model, result in read_eval_dir(eval_dir) if results is None else results:
        if "backfill" in result:
            _check_curve(f"{path}: backfill", result["backfill"])  # written before units were recorded: no unit
            curves.setdefault(result["dataset"], {})[model] = result["backfill"]
    if not curves:
        raise UserError(f"{eval_dir}: no results.json with a backfilling curve (run scripts/test.sh with "
                        f"EVAL.BACKFILL true)")
    return curves


def _check_curve(where, curve, unit=None):
    """A curve as the report reads it (``where``: the file and entry; ``unit``: its refresh unit when its entry
    says it, else the one it records, if any), else a one-line UserError naming them."""
    ok = (isinstance(curve, dict) and isinstance(curve.get("ratios"), list)
          and isinstance(curve.get("values"), list) and len(curve["ratios"]) == len(curve["values"]))
    if not ok:
        raise UserError(f"{where}: expected a curve with lists 'ratios' and 'values' of one length")
    unit = curve.get("unit", unit)
    missing = [k for k in {"image": ("seed",), "batch": ("seed", "batch")}.get(unit, ()) if k not in curve]
    if missing:
        raise UserError(f"{where}: a {unit} curve records its {' and '.join(missing)}")


def _check_unit_curves(path, units):
    """A results.json's "backfill_units" as the report reads it, else a one-line UserError naming the file."""
    if not isinstance(units, dict):
        raise UserError(f"{path}: backfill_units: expected a mapping of refresh unit -> curve, got "
                        f"{type(units).__name__}")
    for unit, curve in units.items():
        _check_curve(f"{path}: backfill_units[{unit!r}]", curve, unit)


def gather_unit_curves(eval_dir, results=None):
    """``{dataset: {model: {unit: curve}}}`` of the results.json files holding "backfill_units" (EVAL.BACKFILL_UNITS),
    each curve with its "auc" (computed here for a curve written without one); ``{}`` when none holds them.
    ``results``: the files, already read by :func:`read_eval_dir`. A malformed entry is a one-line UserError."""
    curves = {}
    for path, model, result in read_eval_dir(eval_dir) if results is None else results:
        units = result.get("backfill_units") or {}
        _check_unit_curves(path, units)
        for unit, curve in units.items():
            if "auc" not in curve and curve.get("values"):
                curve = dict(curve, auc=area_under_curve(curve["ratios"], curve["values"]))
            curves.setdefault(result["dataset"], {}).setdefault(model, {})[unit] = curve
    return curves


def refresh_mode(curve):
    """How a curve's refreshed rows were chosen, e.g. "batches of 16, seed 100"; None for a results.json
    written before the unit was recorded (those are image curves of an unrecorded seed)."""
    if "unit" not in curve:
        return None
    if curve["unit"] == "most_changed":
        return "most changed images first"
    what = f"batches of {curve['batch']}" if curve["unit"] == "batch" else "images"
    return f"{what}, seed {curve['seed']}"


def _axis_and_labels(models):
    """The x-axis label and one legend label per model: a mode shared by every curve goes on the axis,
    differing modes go into the legend so that curves of different units are never taken as alike."""
    modes = {model: refresh_mode(c) for model, c in models.items()}
    known = model_labels()
    labels = {model: known.get(model, model) for model in models}
    if len(set(modes.values())) == 1:
        shared = next(iter(modes.values()))
        return (XLABEL + (f"\n({shared})" if shared else "")), labels
    return XLABEL, {m: f"{labels[m]} ({modes[m] or 'unit not recorded'})" for m in models}


def _plot_models(plt, curves, path):
    """One panel per test set, one line per model (the curve of EVAL.BACKFILL_UNIT)."""
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
    return save_png(plt, fig, path)


def unit_legend_labels(curves):
    """``{unit: label}`` for the line-style legend: the unit and how its rows were chosen when every curve
    of that unit agrees (e.g. "batch: batches of 16, seed 100"), else the unit alone."""
    modes = {}
    for models in curves.values():
        for units in models.values():
            for unit, curve in units.items():
                modes.setdefault(unit, set()).add(refresh_mode(dict(curve, unit=curve.get("unit", unit))))
    return {unit: f"{unit}: {next(iter(m))}" if len(m) == 1 else f"{unit} (settings differ between models)"
            for unit, m in modes.items()}


def _plot_units(plt, curves, path):
    """One panel per test set; colour per model, line style per unit; two legends say which is which."""
    from matplotlib.lines import Line2D

    models = sorted({m for per_set in curves.values() for m in per_set})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    units = unit_legend_labels(curves)
    known = model_labels()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (dataset, per_model) in zip(axes[0], sorted(curves.items())):
        metric = None
        for model, per_unit in sorted(per_model.items()):
            for unit, c in per_unit.items():
                ax.plot([100 * r for r in c["ratios"]], c["values"], color=colours[model],
                        linestyle=UNIT_STYLES.get(unit, "-."), marker="o", markersize=3)
                metric = metric or c.get("metric")
        ax.set_title(dataset)
        ax.set_xlabel(XLABEL)
        ax.set_ylabel(metric or "")
        ax.grid(alpha=0.3)
    model_handles = [Line2D([], [], color=colours[m], label=known.get(m, m)) for m in models]
    unit_handles = [Line2D([], [], color="black", linestyle=UNIT_STYLES.get(u, "-."), label=label)
                    for u, label in units.items()]
    fig.tight_layout()
    fig.legend(handles=model_handles, title="model (colour)", loc="upper left", bbox_to_anchor=(1.0, 1.0),
               fontsize=8)
    fig.legend(handles=unit_handles, title="refresh order (line style)", loc="lower left",
               bbox_to_anchor=(1.0, 0.0), fontsize=8)
    return save_png(plt, fig, path, bbox_inches="tight")  # the legends lie right of the panels


def write_backfill_report(eval_dir, out_prefix):
    """Write ``<out_prefix>.json`` always and ``<out_prefix>.png`` if matplotlib is available; when a
    results.json holds curves of several units, also ``<out_prefix>_units.json`` (``{dataset: {model:
    {unit: curve}}}``, each curve with its auc) and ``<out_prefix>_units.png``. Returns the paths written."""
    results = read_eval_dir(eval_dir)
    curves = gather_curves(eval_dir, results)
    unit_curves = gather_unit_curves(eval_dir, results)
    write_json_atomic(out_prefix + ".json", curves)
    written = [out_prefix + ".json"]
    if unit_curves:
        write_json_atomic(out_prefix + "_units.json", unit_curves)
        written.append(out_prefix + "_units.json")
    plt = pyplot()
    if plt is not None:
        written.append(_plot_models(plt, curves, out_prefix + ".png"))
        if unit_curves:
            written.append(_plot_units(plt, unit_curves, out_prefix + "_units.png"))
    return written
