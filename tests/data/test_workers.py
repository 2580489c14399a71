"""DATA.NUM_WORKERS / EVAL.NUM_WORKERS: explicit counts kept, -1 = min(8, CPUs of the rank - 1), else an error."""

import os

import pytest

from advbct.config import load_config
from advbct.data import workers
from advbct.data.workers import resolve_num_workers
from advbct.errors import UserError


@pytest.mark.parametrize("setting, cpus, ranks, want", [
    (-1, 16, 8, 1),     # 16 // 8 - 1
    (-1, 64, 8, 7),     # 64 // 8 - 1
    (-1, 128, 4, 8),    # 128 // 4 - 1 = 31, capped at 8
    (-1, 2, 1, 1),      # 2 // 1 - 1
    (-1, 1, 1, 0),      # 1 // 1 - 1: load in the main process
    (-1, 4, 8, 0),      # fewer CPUs than ranks: max(0, 0 - 1)
    (-1, 36, 4, 8),     # 36 // 4 - 1
    (-1, 30, 4, 6),     # 30 // 4 - 1 (7 - 1)
    (3, 1, 8, 3),       # explicit counts are used as given, whatever the node
    (0, 128, 1, 0),
    (16, 2, 1, 16),
])
def test_resolution_table(setting, cpus, ranks, want):
    env = {"LOCAL_WORLD_SIZE": str(ranks)}
    assert resolve_num_workers(setting, "DATA.NUM_WORKERS", env=env, cpus=cpus) == want


@pytest.mark.parametrize("env, want", [
    ({"LOCAL_WORLD_SIZE": "8"}, 3),                                  # torchrun: 32 // 8 - 1
    ({"SLURM_NTASKS_PER_NODE": "4"}, 7),                             # srun: 32 // 4 - 1
    ({"LOCAL_WORLD_SIZE": "2", "SLURM_NTASKS_PER_NODE": "4"}, 8),    # torchrun under SLURM: 32 // 2 - 1 = 15 -> 8
    ({"LOCAL_WORLD_SIZE": "", "SLURM_NTASKS_PER_NODE": "16"}, 1),    # empty = unset: 32 // 16 - 1
    ({}, 8),                                                         # one process: 32 // 1 - 1 = 31 -> 8
])
def test_local_ranks_come_from_torchrun_then_slurm_then_one(env, want):
    assert resolve_num_workers(-1, "EVAL.NUM_WORKERS", env=env, cpus=32) == want


@pytest.mark.parametrize("setting, key", [(-2, "DATA.NUM_WORKERS"), (-3, "EVAL.NUM_WORKERS")])
def test_other_negative_settings_name_the_key(setting, key):
    with pytest.raises(UserError) as exc:
        resolve_num_workers(setting, key, env={}, cpus=16)
    assert str(exc.value) == f"{key} {setting}: expected a number of worker processes >= 0, or -1 for auto"


@pytest.mark.parametrize("name, text", [("LOCAL_WORLD_SIZE", "0"), ("LOCAL_WORLD_SIZE", "two"),
                                        ("SLURM_NTASKS_PER_NODE", "4(x2)")])
def test_unreadable_rank_counts_name_the_variable(name, text):
    with pytest.raises(UserError) as exc:
        resolve_num_workers(-1, "DATA.NUM_WORKERS", env={name: text}, cpus=16)
    assert str(exc.value) == f"{name} '{text}': expected a positive number of processes on this node"


def test_cpus_are_the_affinity_mask_where_there_is_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert workers.usable_cpus() == 16
    assert resolve_num_workers(-1, "DATA.NUM_WORKERS", env={"LOCAL_WORLD_SIZE": "8"}) == 1   # 16 // 8 - 1


def test_cpus_are_the_machines_count_without_an_affinity_mask(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert workers.usable_cpus() == 64
    assert resolve_num_workers(-1, "DATA.NUM_WORKERS", env={"LOCAL_WORLD_SIZE": "8"}) == 7   # 64 // 8 - 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)   # unknown: one CPU
    assert resolve_num_workers(-1, "DATA.NUM_WORKERS", env={}) == 0


def test_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_workers(-1, "DATA.NUM_WORKERS", cpus=20) == 4   # 20 // 4 - 1


def test_both_keys_default_to_auto():
    cfg = load_config()
    assert (cfg.DATA.NUM_WORKERS, cfg.EVAL.NUM_WORKERS) == (-1, -1)


@pytest.mark.parametrize("env, want", [
    # a SLURM task that is itself a rank: its CPUs are its own (bound or not), not divided by the tasks again
    ({"SLURM_CPUS_PER_TASK": "4", "SLURM_NTASKS_PER_NODE": "8", "LOCAL_WORLD_SIZE": "8"}, 3),
    ({"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "8"}, 8),
    # one torchrun agent per node: the task's CPUs are shared by its ranks (64 given here as the node's count)
    ({"SLURM_CPUS_PER_TASK": "64", "TORCHELASTIC_RUN_ID": "advbct", "LOCAL_WORLD_SIZE": "8"}, 7),
])
def test_a_slurm_task_counts_its_own_cpus(env, want):
    assert resolve_num_workers(-1, "DATA.NUM_WORKERS", env=env, cpus=64) == want


def test_unreadable_cpus_per_task_names_the_variable():
    with pytest.raises(UserError, match="SLURM_CPUS_PER_TASK 'x4': expected a positive number of CPUs"):
        resolve_num_workers(-1, "DATA.NUM_WORKERS", env={"SLURM_CPUS_PER_TASK": "x4"}, cpus=8)
