"""Collect the compatibility matrices of several methods' chains (matrix.json of scripts/test_generations.sh)
into one table of AC and AM per test set, with each method's matrices.

    python tools/collect_generations.py --method AdvBCT=output/generations/<chain>/advbct/matrix \
        --method BCT=output/generations/<chain>/bct/matrix --out generations.json --markdown generations.md
"""

import os

from advbct.cli import ArgumentParser, guarded
from advbct.errors import UserError
from advbct.evaluation.compatibility_matrix import read_matrix, summary, summary_markdown
from advbct.io import write_json_atomic, write_text_atomic


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", action="append", required=True, help="LABEL=FOLDER (holding matrix.json), repeatable")
    p.add_argument("--description", default="")
    p.add_argument("--out", required=True, help="the summary JSON to write")
    p.add_argument("--markdown", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    methods = {}
    for item in args.method:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise UserError(f"--method expects LABEL=FOLDER, got '{item}'")
        if label in methods:
            raise UserError(f"--method: label '{label}' is given twice")
        methods[label] = read_matrix(os.path.join(folder, "matrix.json"))
    table = summary(methods, args.description)
    md = summary_markdown(table)
    write_json_atomic(args.out, table)
    if args.markdown:
        write_text_atomic(args.markdown, md)
    print(md)


if __name__ == "__main__":
    main()
