"""Generate the synthetic landmark benchmark in the real GLDv2 / ROxford5k / RParis6k formats.

    python tools/make_synthetic.py --out data/synthetic --preset small --seed 0

Writes OUT/gldv2 (images, official CSVs, and the lists of tools/prepare_gldv2.py), OUT/ROxfordParis
(gnd_roxford5k.pkl, gnd_rparis6k.pkl, roxford5k/jpg, rparis6k/jpg) and OUT/SYNTHETIC.json (see Dataset.md).
"""

import json

from advbct.cli import ArgumentParser, guarded
from advbct.data.synthetic import PRESETS, make_synthetic, parse_frame


@guarded
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="size (default small)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a synthetic benchmark previously generated in --out")
    parser.add_argument("--image-size", default=None, metavar="WxH",
                        help="real-size images, e.g. 1024x768 (ROxford's) or 640x480, instead of the preset's "
                             "small squares: for measuring input pipelines (tools/benchmark.py loader)")
    args = parser.parse_args(argv)
    frame = parse_frame(args.image_size) if args.image_size else None
    summary = make_synthetic(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite, frame=frame)
    print(json.dumps({k: summary[k] for k in ("preset", "seed", "roxford5k", "rparis6k", "gldv2")}, indent=2))


if __name__ == "__main__":
    main()
