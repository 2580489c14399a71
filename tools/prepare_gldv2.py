"""Turn the official GLDv2 CSVs into the train list, label map and test lists/ground truth.

Example: python tools/prepare_gldv2.py --csv-dir data/GLDv2 --image-root data/GLDv2 --out data/GLDv2
(see Dataset.md for the files it writes).
"""


from advbct.cli import ArgumentParser, guarded
from advbct.data.gldv2 import prepare_gldv2


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv-dir", required=True,
                        help="folder with train_clean.csv, index.csv, retrieval_solution_v2.1.csv "
                             "(and optionally train.csv, test.csv, which are cross-checked)")
    parser.add_argument("--out", required=True, help="folder to write the lists into")
    parser.add_argument("--image-root", default=None,
                        help="GLDv2 image root (with train/ index/ test/); when given, every listed image "
                             "must exist below it")
    parser.add_argument("--skip-missing", action="store_true",
                        help="with --image-root: drop missing train images instead of failing")
    parser.add_argument("--no-train-csv-check", action="store_true",
                        help="do not cross-check train_clean.csv against train.csv")
    return parser.parse_args(argv)


@guarded
def main(argv=None):
    args = parse_args(argv)
    summary = prepare_gldv2(args.csv_dir, args.out, image_root=args.image_root,
                            skip_missing=args.skip_missing, check_train_csv=not args.no_train_csv_check)
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
