"""Old (30 %) / new (100 %) training allocations of a full train list, by class or by data.

    python tools/split_dataset.py --list data/gldv2/gldv2_train_list.txt --by class --ratio 0.3
    python tools/split_dataset.py --list data/gldv2/gldv2_train_list.txt --by class --chain 0.3,0.6,1.0
(--chain: one nested train list per generation of a chain of models, advbct.data.splits.make_chain_allocation)
"""


from advbct.cli import ArgumentParser, guarded
from advbct.data.splits import make_allocation, make_chain_allocation


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", required=True, help="full train list ('relative/path label' lines)")
    p.add_argument("--by", required=True, choices=["class", "data"], help="allocation type")
    shares = p.add_mutually_exclusive_group()
    shares.add_argument("--ratio", type=float, default=0.3, help="old share (default 0.3)")
    shares.add_argument("--chain", default=None, help="comma-separated shares of a chain of generations, e.g. "
                   "0.3,0.6,1.0: one train list per generation instead of the old/new pair")
    p.add_argument("--out-dir", default=None, help="where to write the lists (default: next to --list)")
    p.add_argument("--dataset", default="gldv2", help="prefix of the written file names")
    args = p.parse_args(argv)
    if args.chain is not None:
        try:
            ratios = [float(r) for r in args.chain.split(",")]
        except ValueError:
            p.error(f"--chain {args.chain}: expected comma-separated numbers, e.g. 0.3,0.6,1.0")
        s = make_chain_allocation(args.list, args.by, ratios, args.out_dir, args.dataset)
        for k, gen in enumerate(s["generations"], 1):
            print(f"generation {k} ({gen['ratio']:g}): {gen['classes']} classes, {gen['images']} images -> {gen['list']}")
        return
    s = make_allocation(args.list, args.by, args.ratio, args.out_dir, args.dataset)
    print(f"old: {s['old_classes']} classes, {s['old_images']} images -> {s['files']['old']}")
    print(f"new: {s['new_classes']} classes, {s['new_images']} images -> {s['files']['new']}")
    if "rest" in s["files"]:
        print(f"(original release's complement list: {s['files']['rest']})")


if __name__ == "__main__":
    main()
