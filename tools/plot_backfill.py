"""Partial-backfilling curves (mAP vs share of the gallery re-embedded) of every model in an eval folder.

    python tools/plot_backfill.py --eval-dir output/reproduce/class_r18/eval --out output/reproduce/class_r18/backfill
writes OUT.json (always) and OUT.png (when matplotlib is installed: pip install -e .[plot]); when the
results hold several refresh units (EVAL.BACKFILL_UNITS), also OUT_units.json and OUT_units.png: the
units side by side (colour per model, line style per unit), each curve with its area under the curve.
"""


from advbct.cli import ArgumentParser, guarded
from advbct.evaluation.backfill_report import write_backfill_report


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-dir", required=True, help="folder with <model>/<dataset>/results.json")
    p.add_argument("--out", required=True,
                   help="output prefix (.json and .png are appended; _units.json and _units.png too when the "
                        "results hold curves of several refresh units)")
    args = p.parse_args(argv)
    written = write_backfill_report(args.eval_dir, args.out)
    skipped = "" if any(w.endswith(".png") for w in written) else " (no matplotlib: PNG skipped)"
    print(f"backfill curves: {', '.join(written)}{skipped}")


if __name__ == "__main__":
    main()
