"""Write the old-class meta file (centers, radii, angular radii) for LCE, UniBCT and AdvBCT.

    torchrun --nproc_per_node=N tools/extract_meta.py --cfg configs/xxx.yml [KEY VALUE ...]
"""

import argparse

from advbct.cli import guarded
from advbct.config import add_config_arguments, load_config


@guarded
def main(argv=None):
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    from advbct import distributed as dist
    from advbct.engine.meta_extraction import extract_meta
    try:
        meta = extract_meta(cfg)
        if dist.is_main_process():
            kept = int((meta.n_kept > 1).sum())
            print(f"meta: {meta.num_classes} classes ({kept} with a usable radius) -> {cfg.COMP_LOSS.META_PATH}")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
