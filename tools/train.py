"""Train an old model, the independent phi*, or a compatible new model (COMP_LOSS.TYPE).

    torchrun --nproc_per_node=N tools/train.py --cfg configs/xxx.yml [KEY VALUE ...]
"""

from advbct.cli import config_main


def run(cfg):
    from advbct.engine.trainer import Trainer
    Trainer(cfg).fit()


def main(argv=None):
    config_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
