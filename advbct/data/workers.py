"""DataLoader worker processes per rank (DATA.NUM_WORKERS, EVAL.NUM_WORKERS): a number, or -1 for auto.

Auto is min(8, max(0, CPUs of this rank - 1)), one CPU staying for the training loop itself. CPUs of this
rank: SLURM_CPUS_PER_TASK where a SLURM task is the rank itself (not a torchrun agent, whose CPUs its ranks
share; a task bound with ``--cpu-bind`` sees only its own CPUs, which must not be divided again); else the
CPUs this process may run on (``os.sched_getaffinity``, else ``os.cpu_count()``) shared among the ranks on
the node (LOCAL_WORLD_SIZE, set by torchrun; else SLURM_NTASKS_PER_NODE; else 1).
"""

import os

from advbct.errors import UserError

AUTO = -1
MAX_AUTO = 8  # the former default of DATA.NUM_WORKERS


def usable_cpus():
    """CPUs this process may run on: its affinity mask where the OS has one (Linux), else all of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_ranks(env=os.environ):
    """Processes of this job on this node: LOCAL_WORLD_SIZE (torchrun), else SLURM_NTASKS_PER_NODE, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        text = env.get(name, "")
        if text:
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise UserError(f"{name} '{text}': expected a positive number of processes on this node")
            return value
    return 1


def resolve_num_workers(setting, key, env=os.environ, cpus=None):
    """``setting`` of config key ``key`` -> worker processes per rank; ``cpus`` overrides the detected count."""
    if setting >= 0:
        return setting
    if setting != AUTO:
        raise UserError(f"{key} {setting}: expected a number of worker processes >= 0, or -1 for auto")
    per_task = env.get("SLURM_CPUS_PER_TASK", "") if "TORCHELASTIC_RUN_ID" not in env else ""
    if per_task:
        if not per_task.isdigit() or int(per_task) < 1:
            raise UserError(f"SLURM_CPUS_PER_TASK '{per_task}': expected a positive number of CPUs")
        per_rank = int(per_task)
    else:
        per_rank = (usable_cpus() if cpus is None else cpus) // local_ranks(env)
    return min(MAX_AUTO, max(0, per_rank - 1))
