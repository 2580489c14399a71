"""The pipelines' command line (scripts/demo.sh, scripts/reproduce_table.sh, scripts/reproduce_ablation.sh,
scripts/reproduce_generations.sh):

    python -m advbct.pipelines demo
    python -m advbct.pipelines table {data,class} {r18,r50} [--synthetic PRESET] [--old-epoch N]
    python -m advbct.pipelines ablation [{data,class} {r18,r50}] [--synthetic PRESET] [--old-epoch N]
    python -m advbct.pipelines generations {data,class} [--methods M1,M2] [--chain BB:SHARE,...] [--synthetic PRESET]

Run from the repository root. The demo reads PRESET (default small), DATA (default
./data/synthetic-<preset>), OUT (default ./output/demo) and NGPUS (default 1) from the environment; a
synthetic block reads DATA (default ./data/synthetic-<preset>). Finished steps are skipped, a training
killed part-way through continues from its last full epoch (advbct.pipelines.training). Exit status:
0 done, 1 a step failed, 2 a usage error or a refusal (data missing or changed), in one line.
"""

import os
import sys
import time

from advbct.cli import guarded
from advbct.errors import UserError
from advbct.pipelines.blocks import (ABLATION_USAGE, TABLE_USAGE, UsageError, ablation_steps, parse_block_args,
                                     resolve_block, table_steps)
from advbct.pipelines.demo import demo_steps
from advbct.pipelines.steps import run_steps

USAGE = "usage: python -m advbct.pipelines {demo,table,ablation,generations} [ARGS]"
DEMO_USAGE = "usage: bash scripts/demo.sh (settings from the environment: PRESET, DATA, OUT, NGPUS)"


def _check_root():
    if not os.path.isfile(os.path.join("scripts", "train_new.sh")):
        raise UserError(f"{os.getcwd()} is not the repository root (no scripts/train_new.sh): run the pipelines "
                        "from there, as scripts/demo.sh and scripts/reproduce_*.sh do")


def demo(argv):
    if argv:
        raise UsageError(DEMO_USAGE)
    start = time.monotonic()
    preset = os.environ.get("PRESET") or "small"
    data = os.environ.get("DATA") or f"./data/synthetic-{preset}"
    out = os.environ.get("OUT") or "./output/demo"
    os.environ["NGPUS"] = os.environ.get("NGPUS") or "1"
    _check_root()
    run_steps(demo_steps(preset, data, out))
    print(f"demo finished in {int(time.monotonic() - start)} s; results in {out}/ (table.json, table.md, "
          "eval/*/*/results.json)")


def _block(argv, usage, plan):
    alloc, backbone, preset, old_epoch = parse_block_args(argv, usage)
    _check_root()
    block = resolve_block(alloc, backbone, preset, old_epoch, (os.environ.get("DATA") or None) if preset else None)
    start = time.monotonic()
    run_steps(plan(block))
    return block, start


def table(argv):
    block, start = _block(argv, TABLE_USAGE, table_steps)
    print(f"block {block.name}{block.tag} finished in {int(time.monotonic() - start)} s: {block.out}/table.md")


def ablation(argv):
    if not argv or argv[0].startswith("--"):  # default: class r18
        argv = ["class", "r18", *argv]
    _block(argv, ABLATION_USAGE, ablation_steps)


def generations(argv):
    from advbct.pipelines.generations import generation_steps, parse_generations_args, resolve_chain

    alloc, methods, chain, preset, against = parse_generations_args(argv)
    _check_root()
    resolved = resolve_chain(alloc, methods, chain, preset, (os.environ.get("DATA") or None) if preset else None,
                             against=against)
    start = time.monotonic()
    run_steps(generation_steps(resolved))
    print(f"chain {os.path.basename(resolved.out)} finished in {int(time.monotonic() - start)} s: "
          f"{resolved.out}/generations.md")


COMMANDS = {"demo": demo, "table": table, "ablation": ablation, "generations": generations}


@guarded
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] not in COMMANDS:
            raise UsageError(USAGE)
        COMMANDS[argv[0]](argv[1:])
    except UsageError as exc:  # the usage line alone (other mistakes: one 'error: ...' line from guarded)
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
