"""Fit the old-to-new transformation (TRANSFORM.TYPE fct | procrustes) and write OUTPUT/transformation.pth.

    torchrun --nproc_per_node=N tools/train_transformation.py --cfg configs/xxx/fct.yml [KEY VALUE ...]
"""

from advbct.cli import config_main


def run(cfg):
    from advbct import distributed as dist
    from advbct.engine.transformation import train_transformation
    s = train_transformation(cfg)
    if dist.is_main_process():
        fitted = f"mean squared error {s['mse_mapped']:.5f}"
        if s["mse_identity"] is not None:
            fitted += f" (old features as they are: {s['mse_identity']:.5f})"
        print(f"transformation: {s['kind']} {s['in_dim']} -> {s['out_dim']} dims on {s['images']} images, "
              f"{fitted} -> {s['path']}")


def main(argv=None):
    config_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
