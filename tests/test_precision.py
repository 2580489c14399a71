"""TRAIN.AMP: ``auto`` resolves to bf16 only where the hardware computes it, and the probe agrees with the CPU.

The trainer's use of the resolved mode (config.yaml, checkpoints, weights) is in tests/test_trainer.py.
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


@pytest.mark.parametrize("mode", ["none", "fp16"])
@pytest.mark.parametrize("native", [True, False])
def test_explicit_modes_are_kept_silently(monkeypatch, mode, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_amp(mode, CPU) == (mode, None)


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


def test_cpu_probe_agrees_with_the_kernels_cpu_flags():
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
