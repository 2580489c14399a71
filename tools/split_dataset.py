"""Old (30 %) / new (100 %) training allocations of a full train list, by class or by data.

    python tools/split_dataset.py --list data/gldv2/gldv2_train_list.txt --by class --ratio 0.3
"""


from advbct.cli import ArgumentParser, guarded
from advbct.data.splits import make_allocation


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", required=True, help="full train list ('relative/path label' lines)")
    p.add_argument("--by", required=True, choices=["class", "data"], help="allocation type")
    p.add_argument("--ratio", type=float, default=0.3, help="old share (default 0.3)")
    p.add_argument("--out-dir", default=None, help="where to write the lists (default: next to --list)")
    p.add_argument("--dataset", default="gldv2", help="prefix of the written file names")
    args = p.parse_args(argv)
    s = make_allocation(args.list, args.by, args.ratio, args.out_dir, args.dataset)
    print(f"old: {s['old_classes']} classes, {s['old_images']} images -> {s['files']['old']}")
    print(f"new: {s['new_classes']} classes, {s['new_images']} images -> {s['files']['new']}")
    if "rest" in s["files"]:
        print(f"(original release's complement list: {s['files']['rest']})")


if __name__ == "__main__":
    main()
