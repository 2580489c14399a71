"""Synchronised BatchNorm for every device: torch's SyncBatchNorm on CUDA, an all-reduce version elsewhere.

torch's ``SyncBatchNorm`` refuses CPU tensors (its kernels are CUDA-only), so multi-process training on
CPU (gloo) would crash with MODEL.SYNC_BN true. :class:`AllReduceBatchNorm` computes the same global
batch statistics with two differentiable all-reduces (sum, then sum of squared deviations), so N
processes with batch B/N normalise exactly like one process with batch B (PAPER.md "Model": SyncBN).

timm models may hold ``timm.layers.BatchNormAct2d``: a BatchNorm2d that also applies a dropout and an
activation. A plain conversion would keep the normalisation and drop the rest, so those layers become
timm's ``SyncBatchNormAct`` (CUDA, through timm's own converter) or :class:`AllReduceBatchNormAct`.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from advbct.errors import UserError


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's copy is the sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all ranks (any device, any input rank >= 2); drop-in state dict."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        local_n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), local_n]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        # two passes (mean, then squared deviations) as a single process does: no E[x^2] - E[x]^2 loss
        var = _AllReduceSum.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n  # biased, for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


class AllReduceBatchNormAct(AllReduceBatchNorm):
    """:class:`AllReduceBatchNorm` followed by the ``drop`` and ``act`` modules of the timm
    ``BatchNormAct2d`` it replaces (same order as timm; same state-dict keys)."""

    def __init__(self, *args, drop: nn.Module, act: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop = drop
        self.act = act

    def forward(self, input):
        return self.act(self.drop(super().forward(input)))


def _timm_norm_act_types() -> tuple:
    """timm's BatchNorm+activation layer types when timm is loaded (a model built from it imported it);
    empty otherwise, so torchvision models never import timm."""
    if sys.modules.get("timm") is None:
        return ()
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    return BatchNormAct2d, SyncBatchNormAct


def _check_convertible(module: nn.Module, norm_act: tuple) -> None:
    """Refuse BatchNorm subclasses with submodules the conversion would lose (other than timm's)."""
    known = (AllReduceBatchNorm, *norm_act)
    for name, sub in module.named_modules():
        if isinstance(sub, _BatchNorm) and not isinstance(sub, known) and any(True for _ in sub.children()):
            raise UserError(f"MODEL.SYNC_BN: cannot synchronise {type(sub).__qualname__} at '{name}' (a "
                            "BatchNorm with submodules of its own); set MODEL.SYNC_BN false")


def _all_reduce_copy(module: _BatchNorm, norm_act: tuple) -> AllReduceBatchNorm:
    """An AllReduceBatchNorm (with the drop/act of a timm BatchNormAct2d) holding ``module``'s state."""
    args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    if norm_act and isinstance(module, norm_act):
        return AllReduceBatchNormAct(*args, drop=module.drop, act=module.act)
    return AllReduceBatchNorm(*args)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over ranks: torch's SyncBatchNorm on CUDA (timm's
    SyncBatchNormAct for its BatchNormAct2d), else ours."""
    norm_act = _timm_norm_act_types()
    _check_convertible(module, norm_act)
    return _convert(module, device, norm_act)


def _convert(module: nn.Module, device: torch.device, norm_act: tuple) -> nn.Module:
    if device.type == "cuda":
        if norm_act and any(isinstance(m, norm_act) for m in module.modules()):
            from timm.layers import convert_sync_batchnorm as timm_convert

            return timm_convert(module)  # plain BatchNorm -> torch's SyncBatchNorm, as below
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        new = _all_reduce_copy(module, norm_act)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        new.requires_grad_(any(p.requires_grad for p in module.parameters()))
        return new.to(next(iter(module.state_dict().values()), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, device, norm_act))
    return module
