"""Self-test and cross-test of a new model against an old one; writes results.json.

    torchrun --nproc_per_node=N tools/test.py --cfg configs/test_model.yml \
        NEW_MODEL.WEIGHTS new.pth OLD_MODEL.WEIGHTS old.pth EVAL.DATASET roxford5k EVAL.ROOT DIR
(``scripts/test.sh`` wraps this with the original release's interface.)
"""

import argparse

from advbct.cli import guarded
from advbct.config import add_config_arguments, load_config


@guarded
def main(argv=None):
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    from advbct.evaluation.evaluate import run_evaluation
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
