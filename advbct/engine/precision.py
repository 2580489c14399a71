"""Numeric format of training: TRAIN.AMP (autocast dtype, ``auto`` resolved per machine) and TRAIN.CHANNELS_LAST.

bf16 autocast pays only where the hardware computes in bf16 (CUDA GPUs from Ampere on; CPUs with avx512_bf16
or AMX, or Arm's bf16 extension). Elsewhere oneDNN emulates it: on a 2-core AVX2 machine a ResNet-18 step
took 7.8 times as long as in fp32 (docs/BENCHMARKS.md). ``auto`` picks bf16 where it is native; on a CUDA GPU
without it but with fp16 tensor cores (sm_70+: V100, T4) fp16 with loss scaling; fp32 otherwise. CPUs get no
fp16: PyTorch's CPU fp16 convolution backward is slow (a ResNet-18 step took 300-500 times as long as in fp32
on a 2-core AVX512/AMX machine), so an explicit TRAIN.AMP fp16 on a CPU is refused.
"""

import contextlib
import platform

import torch

from advbct.errors import UserError

AMP_MODES = ("none", "bf16", "fp16", "auto")


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (x86: avx512_bf16 or AMX; Arm: oneDNN's bf16 check)."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private torch checks: unknown means "do not rely on it"
        return False


def native_bf16(device):
    """Whether ``device`` computes bf16 in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def fp16_tensor_cores(device):
    """Whether ``device`` is a CUDA GPU with fp16 tensor cores (compute capability 7.0 or more)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def resolve_amp(mode, device):
    """TRAIN.AMP -> (mode used on ``device``, a note for the log or None). ``auto``: bf16 where native, else fp16
    on CUDA GPUs with fp16 tensor cores, else none; an explicit bf16 without native support is kept with a note."""
    if mode not in AMP_MODES:
        raise UserError(f"TRAIN.AMP must be one of {', '.join(AMP_MODES)}, got '{mode}'")
    if mode == "auto":
        if native_bf16(device):
            used, why = "bf16", "computes bf16 natively"
        elif fp16_tensor_cores(device):
            used, why = "fp16", "has no native bf16; fp16 autocast with loss scaling"
        elif device.type == "cuda":
            used, why = "none", "has neither native bf16 nor fp16 tensor cores (sm_70 or newer)"
        else:
            used, why = "none", "has no native bf16 (it would be emulated, slower than fp32)"
        return used, f"TRAIN.AMP auto -> {used}: this {device.type} ({capability(device)}) {why}"
    if mode == "fp16" and device.type == "cpu":
        raise UserError("TRAIN.AMP fp16 on a cpu: PyTorch's CPU fp16 convolution backward is hundreds of times "
                        "slower than fp32; use TRAIN.AMP auto, bf16 or none")
    if mode == "bf16" and not native_bf16(device):
        fallback = "fp16" if fp16_tensor_cores(device) else "fp32"
        return mode, (f"warning: TRAIN.AMP bf16 on a {device.type} ({capability(device)}) without native bf16: "
                      f"autocast is emulated and slower than fp32; TRAIN.AMP auto trains in {fallback}")
    return mode, None


def capability(device):
    """A few words naming the hardware for the log: the GPU's name and sm_XY, or torch's CPU vector capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}"
    return torch.backends.cpu.get_cpu_capability()


def autocast_context(mode, device):
    """The autocast context of a resolved TRAIN.AMP (none, bf16 or fp16)."""
    if mode == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    if dtype is None:
        raise UserError(f"TRAIN.AMP must be none, bf16 or fp16 here, got '{mode}'")
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(channels_last):
    """TRAIN.CHANNELS_LAST -> the layout of models and batches. NHWC: oneDNN's bf16 convolutions run ~1.3x
    faster in it on CPU (docs/BENCHMARKS.md); values are unchanged."""
    return torch.channels_last if channels_last else torch.contiguous_format
