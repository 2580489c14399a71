"""Write the old-class meta file (centers, radii, angular radii) for LCE, UniBCT and AdvBCT.

    torchrun --nproc_per_node=N tools/extract_meta.py --cfg configs/xxx.yml [KEY VALUE ...]
"""

from advbct.cli import config_main


def run(cfg):
    from advbct import distributed as dist
    from advbct.engine.meta_extraction import extract_meta
    meta = extract_meta(cfg)
    if dist.is_main_process():
        kept = int((meta.n_kept > 1).sum())
        print(f"meta: {meta.num_classes} classes ({kept} with a usable radius) -> {cfg.COMP_LOSS.META_PATH}")


def main(argv=None):
    config_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
