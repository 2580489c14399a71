"""Partial-backfilling curves (mAP vs share of the gallery re-embedded) of every model in an eval folder.

    python tools/plot_backfill.py --eval-dir output/reproduce/class_r18/eval --out output/reproduce/class_r18/backfill
writes OUT.json (always) and OUT.png (when matplotlib is installed: pip install -e .[plot]).
"""


from advbct.cli import ArgumentParser, guarded
from advbct.evaluation.backfill_report import write_backfill_report


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-dir", required=True, help="folder with <model>/<dataset>/results.json")
    p.add_argument("--out", required=True, help="output prefix (.json and .png are appended)")
    args = p.parse_args(argv)
    js, png = write_backfill_report(args.eval_dir, args.out)
    print(f"backfill curves: {js}" + (f", {png}" if png else " (no matplotlib: PNG skipped)"))


if __name__ == "__main__":
    main()
