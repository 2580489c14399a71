"""Self-test and cross-test of a new model against an old one; writes results.json.

    torchrun --nproc_per_node=N tools/test.py --cfg configs/test_model.yml \
        NEW_MODEL.WEIGHTS new.pth OLD_MODEL.WEIGHTS old.pth EVAL.DATASET roxford5k EVAL.ROOT DIR
(``scripts/test.sh`` wraps this with the original release's interface.)
"""

from advbct.cli import config_main


def run(cfg):
    from advbct.evaluation.evaluate import run_evaluation
    run_evaluation(cfg)


def main(argv=None):
    config_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
