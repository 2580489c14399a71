"""The compatibility matrix of a chain of model generations (every pair i >= j, AC, AM); writes matrix.{json,md,png}.

    torchrun --nproc_per_node=N tools/test_generations.py --cfg configs/test_model.yml \
        GENERATIONS.WEIGHTS [gen1.pth,gen2.pth,gen3.pth] GENERATIONS.ARCHS [resnet18,resnet18,resnet50] \
        EVAL.DATASET rparis6k,roxford5k EVAL.ROOT DIR EVAL.SAVE_DIR OUT
(``scripts/test_generations.sh`` wraps this like scripts/test.sh.)
"""

from advbct.cli import config_main


def run(cfg):
    from advbct.evaluation.generations import run_generations
    run_generations(cfg)


def main(argv=None):
    config_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
