"""Benchmarks whose figures go into docs/BENCHMARKS.md (never timed assertions in tests).

    python tools/benchmark.py {metrics,search,extraction,loader,losses,training} [options] [--json OUT.json]
    torchrun --standalone --nproc_per_node=N tools/benchmark.py collectives [options] [--json OUT.json]
"""

import importlib
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/benchmarks/ as a package

from advbct.cli import ArgumentParser, guarded  # noqa: E402
from advbct.io import atomic_open  # noqa: E402

SUITES = ("metrics", "search", "extraction", "loader", "losses", "training", "collectives")


def machine():
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


@guarded
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        module = importlib.import_module(f"benchmarks.{name}")
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.add_argument("--json", default=None, help="write the figures to this JSON file")
        p.set_defaults(module=module)
    args = parser.parse_args(argv)
    result = args.module.run(args)
    if result is None:  # a rank other than 0 of a multi-process suite: rank 0 reports
        return
    print(json.dumps({"machine": machine(), args.suite: result}, indent=1))
    if args.json:
        with atomic_open(args.json) as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
