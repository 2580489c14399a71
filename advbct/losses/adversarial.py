"""AdvBCT's adversarial term L_adv: a discriminator on GRL(f_n) vs f_o (PAPER.md "Adversarial")."""

from __future__ import annotations

import torch
from torch import nn

from advbct.errors import UserError
from advbct.losses.discriminator import Discriminator, grad_reverse, grl_alpha

SCHEDULES = ("decay", "constant")


def adversarial_weight(epoch: int, total_epochs: int, schedule: str = "decay") -> float:
    """w(e) = (E − e + 1)/E for 0-based epoch e ("decay", the original code) or 1 ("constant")."""
    if schedule == "constant":
        return 1.0
    return (total_epochs - epoch + 1) / total_epochs


class AdversarialLoss(nn.Module):
    """L_adv = NLL(D(GRL_α(f_n)), 0) + NLL(D(f_o), 1) on un-normalised embeddings.

    The discriminator learns to tell new (0) from old (1) embeddings; the gradient reversal
    (forward identity, backward × −α, α = 2/(1+e^{−γp}) − 1) makes the new model fool it. New and
    old halves go through the discriminator separately (its BatchNorm sees each half alone), as in
    the original model.
    """

    def __init__(self, embed_dim: int, hidden: int = 100, gamma: float = 10.0):
        super().__init__()
        self.gamma = float(gamma)
        self.discriminator = Discriminator(embed_dim, hidden)

    def forward(self, feat_new: torch.Tensor, feat_old: torch.Tensor, progress: float):
        """Return (L_adv, diagnostics {disc_acc}, α)."""
        alpha = grl_alpha(progress, self.gamma)
        logp_new = self.discriminator(grad_reverse(feat_new, alpha))
        logp_old = self.discriminator(feat_old.detach())
        loss = -logp_new[:, 0].mean() - logp_old[:, 1].mean()
        with torch.no_grad():  # accuracy of argmax (ties go to class 0, as argmax)
            correct = (logp_new[:, 0] >= logp_new[:, 1]).sum() + (logp_old[:, 1] > logp_old[:, 0]).sum()
            acc = correct / float(logp_new.shape[0] + logp_old.shape[0])
        return loss, {"disc_acc": acc}, alpha


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise UserError(f"COMP_LOSS.ADV_SCHEDULE '{schedule}': expected one of {', '.join(SCHEDULES)}")
    return schedule
