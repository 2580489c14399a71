"""TRAIN.AMP: ``auto`` resolves to bf16 where native, fp16 on CUDA GPUs with fp16 tensor cores, else none.

The trainer's use of the resolved mode (config.yaml, checkpoints, weights) is in tests/engine/test_trainer.py.
"""

import platform
from pathlib import Path

import pytest
import torch

from advbct.engine import precision
from advbct.errors import UserError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "none")])
def test_auto_is_bf16_only_where_native(monkeypatch, native, want):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    used, note = precision.resolve_amp("auto", CPU)
    assert used == want
    assert note.startswith(f"TRAIN.AMP auto -> {want}: this cpu (")
    assert ("no native bf16" in note) == (not native)


@pytest.mark.parametrize("native", [True, False])
def test_explicit_none_is_kept_silently(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_amp("none", CPU) == ("none", None)


def test_explicit_bf16_is_kept_with_a_warning_only_where_emulated(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_amp("bf16", CPU) == ("bf16", None)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    used, note = precision.resolve_amp("bf16", CPU)
    assert used == "bf16" and note.startswith("warning: TRAIN.AMP bf16 on a cpu (") and "TRAIN.AMP auto" in note


def test_unknown_mode_names_the_key_and_the_choices():
    with pytest.raises(UserError) as exc:
        precision.resolve_amp("fp32", CPU)
    assert str(exc.value) == "TRAIN.AMP must be one of none, bf16, fp16, auto, got 'fp32'"


def test_autocast_context_dtypes():
    x = torch.randn(4, 4)
    with precision.autocast_context("bf16", CPU):
        assert (x @ x).dtype == torch.bfloat16
    with precision.autocast_context("none", CPU):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(UserError, match="got 'auto'"):   # only resolved modes reach autocast
        precision.autocast_context("auto", CPU)


def test_cpu_check_agrees_with_the_kernels_cpu_flags():
    """On Linux x86 the kernel lists the CPU's features: native bf16 <=> avx512_bf16 or an AMX flag."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpuinfo.is_file():
        pytest.skip("the reference (/proc/cpuinfo flags) exists on Linux x86 only")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert flags, "no flags line in /proc/cpuinfo"
    assert precision.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


# CUDA GPUs: (name, compute capability, torch.cuda.is_bf16_supported(including_emulation=False)) -> auto's pick
GPUS = {
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), True),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), True),
    "V100": ("Tesla V100-SXM2-32GB", (7, 0), False),
    "T4": ("Tesla T4", (7, 5), False),
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), False),
    "K80": ("Tesla K80", (3, 7), False),
}
GPU = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Patch the three torch.cuda queries resolve_amp may ask; any other CUDA call fails the test."""
    def use(gpu):
        name, cap, bf16 = GPUS[gpu]

        def is_bf16_supported(including_emulation=True):
            assert including_emulation is False   # emulated bf16 does not count as native
            return bf16

        def by_device(value):
            def query(device=None):
                assert device == GPU
                return value
            return query

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_capability", by_device(cap))
        monkeypatch.setattr(torch.cuda, "get_device_name", by_device(name))

    def no_real_cuda(*args, **kwargs):
        raise AssertionError("resolve_amp touched the CUDA runtime")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_real_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_real_cuda)
    monkeypatch.setattr(torch.cuda, "current_device", no_real_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_real_cuda)
    return use


@pytest.mark.parametrize("gpu, want, note", [
    ("A100", "bf16", "TRAIN.AMP auto -> bf16: this cuda (NVIDIA A100-SXM4-80GB, sm_80) computes bf16 natively"),
    ("H100", "bf16", "TRAIN.AMP auto -> bf16: this cuda (NVIDIA H100 80GB HBM3, sm_90) computes bf16 natively"),
    ("V100", "fp16", "TRAIN.AMP auto -> fp16: this cuda (Tesla V100-SXM2-32GB, sm_70) has no native bf16; "
                     "fp16 autocast with loss scaling"),
    ("T4", "fp16", "TRAIN.AMP auto -> fp16: this cuda (Tesla T4, sm_75) has no native bf16; "
                   "fp16 autocast with loss scaling"),
    ("P100", "none", "TRAIN.AMP auto -> none: this cuda (Tesla P100-PCIE-16GB, sm_60) has neither native bf16 "
                     "nor fp16 tensor cores (sm_70 or newer)"),
    ("K80", "none", "TRAIN.AMP auto -> none: this cuda (Tesla K80, sm_37) has neither native bf16 "
                    "nor fp16 tensor cores (sm_70 or newer)"),
])
def test_auto_on_cuda_gpus(fake_gpu, gpu, want, note):
    fake_gpu(gpu)
    assert precision.resolve_amp("auto", GPU) == (want, note)


@pytest.mark.parametrize("gpu", ["A100", "V100", "K80"])
@pytest.mark.parametrize("mode", ["none", "fp16"])
def test_explicit_none_and_fp16_on_cuda_are_kept_silently(fake_gpu, gpu, mode):
    fake_gpu(gpu)
    assert precision.resolve_amp(mode, GPU) == (mode, None)


@pytest.mark.parametrize("gpu, note", [
    ("A100", None),
    ("V100", "warning: TRAIN.AMP bf16 on a cuda (Tesla V100-SXM2-32GB, sm_70) without native bf16: autocast is "
             "emulated and slower than fp32; TRAIN.AMP auto trains in fp16"),
    ("K80", "warning: TRAIN.AMP bf16 on a cuda (Tesla K80, sm_37) without native bf16: autocast is "
            "emulated and slower than fp32; TRAIN.AMP auto trains in fp32"),
])
def test_explicit_bf16_on_cuda(fake_gpu, gpu, note):
    fake_gpu(gpu)
    assert precision.resolve_amp("bf16", GPU) == ("bf16", note)


@pytest.mark.parametrize("native", [True, False])
def test_explicit_fp16_on_cpu_is_refused(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with pytest.raises(UserError) as exc:
        precision.resolve_amp("fp16", CPU)
    assert str(exc.value) == ("TRAIN.AMP fp16 on a cpu: PyTorch's CPU fp16 convolution backward is hundreds of "
                              "times slower than fp32; use TRAIN.AMP auto, bf16 or none")


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "none")])
def test_auto_on_cpu_never_picks_fp16(monkeypatch, native, want):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    why = "computes bf16 natively" if native else "has no native bf16 (it would be emulated, slower than fp32)"
    assert precision.resolve_amp("auto", CPU) == (want, f"TRAIN.AMP auto -> {want}: this cpu (AVX2) {why}")
