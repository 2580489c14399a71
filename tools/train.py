"""Train an old model, the independent phi*, or a compatible new model (COMP_LOSS.TYPE).

    torchrun --nproc_per_node=N tools/train.py --cfg configs/xxx.yml [KEY VALUE ...]
"""

import argparse

from advbct.cli import guarded
from advbct.config import add_config_arguments, load_config


@guarded
def main(argv=None):
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    from advbct.engine.trainer import Trainer  # torch import after the config is known to be valid
    from advbct import distributed as dist
    try:
        Trainer(cfg).fit()
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
