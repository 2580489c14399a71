"""advbct: Boundary-aware Backward-Compatible Training (AdvBCT, CVPR 2023), reproduced."""

__version__ = "0.1.0"
