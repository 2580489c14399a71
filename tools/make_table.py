"""Turn a results table JSON into the paper's table: fill P_up / P_comp / P_1, print markdown.

Example: python tools/make_table.py --from-json output/table.json --markdown output/table.md \
             --reference data/paper_table.json
"""

import argparse

from advbct.cli import ArgumentParser, guarded
from advbct.evaluation.reporting import make_table


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", required=True, metavar="T.json",
                        help="results table (schema of paper_table.json: datasets, blocks.*.old/independent/methods)")
    parser.add_argument("--json", metavar="OUT.json", help="write the table with computed P values here")
    parser.add_argument("--markdown", metavar="OUT.md", help="write the markdown table here")
    parser.add_argument("--reference", metavar="PAPER.json",
                        help="a table of the same schema (e.g. the paper's) shown beside ours as 'ours (paper)'")
    return parser.parse_args(argv)


@guarded
def main(argv=None):
    args = parse_args(argv)
    print(make_table(args.from_json, json_out=args.json, markdown_out=args.markdown, reference=args.reference), end="")


if __name__ == "__main__":
    main()
