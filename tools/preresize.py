"""Make a copy of a dataset root whose images are resized to a short side of 256 px (faster to decode).

    python tools/preresize.py --src data/gldv2 --dst data/gldv2_256 [--short-side 256] [--quality 95] [--workers N]

Same relative paths and file names (lists and CSVs copied as they are, query boxes of gnd_*.pkl rescaled), so
DATA.ROOT / EVAL.ROOT can point at the copy. Resumable: rerun the same command after an interruption. Prints the
summary as JSON; exits 1 when written files failed their check (listed; a rerun retries them).
"""

import json
import sys

from advbct.cli import ArgumentParser, guarded
from advbct.data.preresize import preresize


@guarded
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="dataset root to copy")
    parser.add_argument("--dst", required=True, help="new root (created; or a copy of --src to finish)")
    parser.add_argument("--short-side", type=int, default=256, help="short side of the resized images (default 256)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of resized JPEGs (default 95)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every usable CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    summary = preresize(args.src, args.dst, short_side=args.short_side, quality=args.quality, workers=args.workers,
                        progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    if summary["failed"]:
        print(f"error: {summary['failed']} written images failed their check and were removed (failed_files "
              "above); rerun to retry them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
