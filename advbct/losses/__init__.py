"""Compatibility losses: one method per file, each registering itself at import (advbct/losses/registry.py).

The imports below are the built-in methods' registration; their order is the registry's order: the
order of COMP_LOSS.TYPE's help and of the result tables (the paper's: BCT, LCE, UniBCT, Hot-refresh,
AdvBCT; then L2, not a row of the paper's table).
"""

from advbct.losses import bct, lce, unibct, hot_refresh, advbct, l2  # noqa: F401  (registration order)
from advbct.losses import mixbct  # noqa: F401  (MixBCT, published after AdvBCT: not a paper row)
from advbct.losses import bt2  # noqa: F401  (BT², published after AdvBCT: not a paper row)
from advbct.losses import fct  # noqa: F401  (FCT: no term; old embeddings mapped after training)
from advbct.losses.base import CompatibilityLoss
from advbct.losses.build import build_compat_loss, needs_meta, needs_old_classifier
from advbct.losses.registry import (
    LOSS_CLASSES as LOSSES,
    BuildContext,
    Option,
    Options,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)

__all__ = [
    "LOSSES",
    "BuildContext",
    "CompatibilityLoss",
    "Option",
    "Options",
    "build_compat_loss",
    "get_method",
    "list_methods",
    "needs_meta",
    "needs_old_classifier",
    "register_method",
    "unregister_method",
]
