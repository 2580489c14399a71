"""Evaluate saved features (rows in the dataset's query / gallery order) against a test set's ground truth.

    python tools/evaluate_features.py --dataset roxford5k --root data/ROxfordParis \
        --query q.npy --gallery g.npy [--json out.json]
Numbers in percent: revisited E/M/H mAP and mP@1,5,10, or GLDv2 mAP@100. Images are not needed.
"""

import os

import numpy as np

from advbct.cli import ArgumentParser, guarded
from advbct.errors import UserError
from advbct.evaluation import test_sets
from advbct.evaluation.protocol import check_features, load_test_set, score
from advbct.io import write_json_atomic


def load_features(path, what):
    if not os.path.isfile(path):
        raise UserError(f"--{what}: feature file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"--{what}: {path} is not a .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping of arrays
        raise UserError(f"--{what}: {path} is not a .npy array (an .npz archive?)")
    if not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"--{what}: {path} holds {arr.dtype} values, expected numbers")
    return arr.astype(np.float32, copy=False)


@guarded
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, choices=test_sets.names())
    p.add_argument("--root", required=True, help="dataset root (see Dataset.md)")
    p.add_argument("--query", required=True, help="query features .npy (n_query x d)")
    p.add_argument("--gallery", required=True, help="gallery features .npy (n_gallery x d)")
    p.add_argument("--gldv2-split", default="private", choices=["private", "public"])
    p.add_argument("--json", default=None, help="write the metrics here")
    args = p.parse_args(argv)
    test_set = load_test_set(args.dataset, args.root, args.gldv2_split, check_images=False)
    query, gallery = load_features(args.query, "query"), load_features(args.gallery, "gallery")
    check_features(test_set, query, gallery, source=f"--query {args.query}, --gallery {args.gallery}")
    metrics = score(test_set, query, gallery)
    out = {"dataset": args.dataset, **{k: v for k, v in metrics.items() if k != "n_queries"}}
    if "mAP" in out:
        print("mAP  E {easy:.2f}  M {medium:.2f}  H {hard:.2f}".format(**out["mAP"]))
        for prot in ("easy", "medium", "hard"):
            print(f"mP@k {prot:6s} " + "  ".join(f"@{k} {v:.2f}" for k, v in out["mP@k"][prot].items()))
    else:  # mAP@100 (GLDv2), or the scalar metrics of another registered test set
        for key, value in out.items():
            if key != "dataset":
                print(f"{key} {value:.2f}")
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
