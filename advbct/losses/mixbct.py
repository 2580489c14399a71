"""MixBCT (Liang et al., 2023, arXiv 2308.06948; code github.com/yuleung/MixBCT): the new classifier trained
on a batch in which some new embeddings are replaced by the old embeddings of the same images.

Why MixBCT and not NCCL (Wu et al., AAAI 2022): MixBCT's released training script pins the whole method down
(one loss, the mix ratio α = 0.3, the denoising keep ratio T = 0.9) and needs only what this trainer passes
a compatibility loss: the old embeddings of the batch and the new classifier. NCCL's authors published no
code (none found); the one public implementation (in MixBCT's repository) picks its own temperature (1) and
neighbour weights (½(⟨f̂_o,i, f̂_o,j⟩ + 1)), skips the paper's filtering of low-credibility old embeddings
(an offline pass over every old training embedding, a flag per image this trainer does not have), and its
discrimination-space term keeps a queue of logits over every training class (8192 × 81,313 floats on GLDv2).

The release (BCT_Methods/MixBCT/train.py) per step and GPU: draws ⌊α·B⌋ rows at random among the batch's
"credible" rows, writes the old embedding into those rows of the new embeddings, and takes the new
model's classification loss over that mixed batch as the whole objective:

    L_mix = 1/B · Σ_i CE(h(z_i), y_i),   z_i = f_o,i for the drawn rows R, f_n,i otherwise.

The trainer already adds L_cls = 1/B · Σ_i CE(h(f_n,i), y_i), so this term is

    term = 1/B · Σ_{i∈R} [CE(h(f_o,i), y_i) − CE(h(f_n,i), y_i)]   (MIX_REPLACE true: L_cls + term = L_mix)
    term = 1/B · Σ_{i∈R}  CE(h(f_o,i), y_i)                          (MIX_REPLACE false: the drawn rows keep
                                                                      their own classification term too)

Like the release (per GPU), each rank draws from and averages over its own batch: no state across steps,
nothing to gather or resume. The old embeddings are frozen: their CE trains the new classifier only,
which pulls the class weights toward the old feature distribution and through them the new embeddings
(the paper's "self-adapting" constraint: the wider an old class spreads, the looser the constraint). h
is the head the trainer classifies with: the config's LOSS section (LOSS.TYPE / SCALE / MARGIN), which the
builder passes to every method (advbct.losses.build_compat_loss, BuildContext.classifier / scale / margin),
so it cannot differ from the new model's.

Deviations, each forced by what the trainer has: the release's denoising keeps, per class, the 90 % of the
old training embeddings nearest the class mean (an offline flag per image); here an old-class row is
credible when its normalised old embedding lies within the meta's kept radius r_max of its class center
(the 1.5·IQR outlier rule of advbct/meta.py), and rows of classes the meta has no samples of (every new
class) are always credible. The release L2-normalises the old embeddings before mixing, a no-op under its
normalised ArcFace head; here they enter the head as the old model gives them, like the new ones (the
softmax head reads the norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advbct.errors import UserError
from advbct.losses.base import CompatibilityLoss, masked_mean, old_class_index
from advbct.losses.registry import Option, register_method
from advbct.meta import ClassMeta

HEADS = ("softmax", "arcface", "cosface")  # advbct.models.heads.CLASSIFIERS (not imported: it pulls torchvision)
DENOISE = ("meta", "none")
_ACOS_EPS = 1e-7  # as advbct.models.heads: keeps acos' derivative finite at cos = ±1


def head_logits(kind: str, feat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float,
                margin: float) -> torch.Tensor:
    """Training logits of the trainer's classifier heads (advbct/models/heads.py; tests check they agree):
    softmax f Wᵀ; arcface s·cos with s·cos(θ_y + m) at the target; cosface s·cos with s·(cos_y − m)."""
    if kind == "softmax":
        return feat @ weight.t()
    cos = F.normalize(feat, dim=1) @ F.normalize(weight, dim=1).t()
    target = cos.gather(1, labels[:, None])
    if kind == "arcface":
        target = torch.cos(torch.acos(target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS)) + margin)
    else:
        target = target - margin
    return scale * cos.scatter(1, labels[:, None], target)


def draw_rows(candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` rows drawn uniformly without replacement among the ``candidates`` (B,) mask.

    Returns (row indices (count,), whether each drawn row is a candidate): fewer than ``count``
    candidates leave the rest of the draw invalid (the release would fail there). Fixed shapes, no
    host sync: every row gets a uniform score, non-candidates score −1, the top ``count`` are drawn.
    """
    scores = torch.rand(candidates.shape[0], device=candidates.device)
    rows = torch.where(candidates, scores, torch.full_like(scores, -1.0)).topk(count).indices
    return rows, candidates[rows]


class MixBCTLoss(CompatibilityLoss):
    """The old-embedding share of the release's mixed-batch classification loss (module docstring).

    Diagnostics: ``mixbct`` (the term), ``old_ce`` (mean CE of the mixed-in old embeddings under the new
    classifier), ``mixed_fraction`` (rows replaced / B) and ``credible_fraction`` (candidate rows / B).
    """

    needs_new_classifier = True

    def __init__(self, num_old_classes: int, meta: ClassMeta | None = None, ratio: float = 0.3,
                 denoise: str = "meta", replace: bool = True, head: str = "softmax", scale: float = 30.0,
                 margin: float = 0.3, weight: float = 1.0):
        super().__init__(num_old_classes, weight)
        if denoise not in DENOISE:
            raise UserError(f"COMP_LOSS.MIX_DENOISE '{denoise}': expected one of {', '.join(DENOISE)}")
        if head not in HEADS:
            raise UserError(f"LOSS.TYPE '{head}': mixbct supports the heads {', '.join(HEADS)}")
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"COMP_LOSS.MIX_RATIO {ratio}: expected a fraction in (0, 1]")
        self.ratio, self.denoise, self.replace = float(ratio), denoise, bool(replace)
        self.head, self.scale, self.margin = head, float(scale), float(margin)
        self.needs_meta = denoise == "meta"
        if self.needs_meta:
            n = self.num_old_classes
            self.register_buffer("centers", meta.centers[:n].float().clone(), persistent=False)
            self.register_buffer("r_max", meta.r_max[:n].float().clone(), persistent=False)
            self.register_buffer("has_stats", meta.n_kept[:n] > 0, persistent=False)

    def credible(self, feat_old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) rows whose old embedding may be mixed in (the denoising; module docstring)."""
        if not self.needs_meta:
            return torch.ones_like(labels, dtype=torch.bool)
        is_old, idx = old_class_index(labels, self.num_old_classes)
        dist = (F.normalize(feat_old, dim=1) - self.centers[idx]).norm(dim=1)
        filtered = is_old & self.has_stats[idx]
        return ~filtered | (dist <= self.r_max[idx])

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        if new_classifier_weight is None:
            raise ValueError("MixBCTLoss needs new_classifier_weight (the new model's classifier weight)")
        batch = labels.shape[0]
        candidates = self.credible(feat_old, labels)
        rows, valid = draw_rows(candidates, int(batch * self.ratio))  # the release: int(batch_size * mix_ratio)
        y = labels[rows]

        def ce(feat):
            logits = head_logits(self.head, feat, new_classifier_weight, y, self.scale, self.margin)
            return F.cross_entropy(logits, y, reduction="none")

        old_ce = ce(feat_old[rows])
        per_row = old_ce - ce(feat_new[rows]) if self.replace else old_ce
        term = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / batch
        return term, {"mixbct": term, "old_ce": masked_mean(old_ce, valid),
                      "mixed_fraction": valid.float().sum() / batch,
                      "credible_fraction": candidates.float().mean()}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ratio={self.ratio}, denoise={self.denoise}, replace={self.replace}, "
                f"head={self.head}, scale={self.scale}, margin={self.margin}")


def build_mixbct(opts, ctx):
    """The loss with the new model's head: ``ctx.classifier`` / ``scale`` / ``margin`` (the LOSS section)."""
    if ctx.classifier not in HEADS:
        raise UserError(f"LOSS.TYPE '{ctx.classifier}': mixbct supports the heads {', '.join(HEADS)}")
    return MixBCTLoss(ctx.num_old_classes, meta=ctx.meta, ratio=opts.MIX_RATIO, denoise=opts.MIX_DENOISE,
                      replace=opts.MIX_REPLACE, head=ctx.classifier, scale=ctx.scale, margin=ctx.margin,
                      weight=opts.WEIGHT)


register_method(
    "mixbct", MixBCTLoss, label="MixBCT", paper_row=False,  # published after AdvBCT: not a row of its table
    needs_meta=lambda opts: opts.MIX_DENOISE == "meta",  # only the denoising reads the old-class meta
    options=[
        Option("MIX_RATIO", 0.3, "mixbct: fraction of the batch whose new embedding is swapped for the old one",
               valid=lambda a: 0.0 < a <= 1.0, expect="a fraction in (0, 1]"),
        Option("MIX_DENOISE", "meta", "mixbct: which old embeddings may be mixed in: meta (old-class ones within "
               "the meta's r_max of their center; new classes all) | none (all)", choices=DENOISE),
        Option("MIX_REPLACE", True, "mixbct: swapped rows lose their new-feature CE, so L_cls + term is the "
               "release's mixed-batch loss; false = only add the old-feature CE"),
    ],
    build=build_mixbct,
)
