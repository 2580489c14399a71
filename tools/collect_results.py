"""Turn per-model evaluation folders (``<dir>/<dataset>/results.json``) into a table JSON.

    python tools/collect_results.py --independent output/demo/eval/independent \
        --method AdvBCT=output/demo/eval/advbct --block class --out output/demo/table.json
"""

import os

from advbct.cli import ArgumentParser, guarded
from advbct.errors import UserError
from advbct.evaluation import test_sets
from advbct.evaluation.collect import collect_block, criterion_report
from advbct.evaluation.reporting import fill_scores, load_table, render_markdown
from advbct.io import write_json_atomic, write_text_atomic


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--independent", required=True, help="evaluation folder of φ* (also gives old self-test)")
    p.add_argument("--method", action="append", default=[], help="NAME=FOLDER, repeatable")
    p.add_argument("--datasets", nargs="+", default=list(test_sets.names()),
                   help="test sets, in the table's column order (default: every registered one, in the "
                        "paper's order)")
    p.add_argument("--block", default="block", help="block name in the table")
    p.add_argument("--description", default="")
    p.add_argument("--out", required=True, help="table JSON to write (schema of paper_table.json)")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    p.add_argument("--reference", default=None, help="a table JSON (e.g. the paper's) shown beside ours")
    p.add_argument("--criterion", action="store_true",
                   help="also say whether each method's cross-test beats the old self-test")
    args = p.parse_args(argv)
    methods = {}
    for item in args.method:
        if "=" not in item:
            raise UserError(f"--method expects NAME=FOLDER, got '{item}'")
        name, folder = item.split("=", 1)
        if "=" in folder and not os.path.isdir(folder):  # "T = 0.4=dir": the name itself held an '='
            raise UserError(f"--method '{item}': NAME must not contain '=' (expected NAME=FOLDER)")
        methods[name] = folder
    table = collect_block(args.independent, methods, args.datasets, args.description)
    table["blocks"] = {args.block: table["blocks"]["block"]}
    table = fill_scores(table, source=args.out)
    write_json_atomic(args.out, table)
    md = render_markdown(table, reference=load_table(args.reference) if args.reference else None)
    if args.markdown:
        write_text_atomic(args.markdown, md)
    print(md)
    if args.criterion:
        lines, ok = criterion_report(table)
        print("\n".join(lines))
        print("compatibility criterion (cross-test > old self-test) "
              + ("holds everywhere" if ok else "does NOT hold everywhere"))


if __name__ == "__main__":
    main()
