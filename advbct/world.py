"""Where this process sits in the run: the torch.distributed environment from torchrun's or SLURM's variables.

Pure functions of an environment mapping (no torch import), so that ``scripts/lib/launch.sh`` can ask
them cheaply and ``advbct.distributed`` can turn an ``srun`` task into a rank before
``init_process_group(init_method="env://")``.

    python -m advbct.world master        # "ADDR PORT" of an srun step (rendezvous of its tasks)
    python -m advbct.world hostnames NODELIST
"""

import re
import sys

from advbct.errors import UserError

_RANGE = re.compile(r"(\d+)(?:-(\d+))?$")


def _split_top(text, sep=","):
    """``text`` split at ``sep`` outside brackets (``a[1,3],b`` -> ``a[1,3]``, ``b``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError("unbalanced or nested brackets")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced brackets")
    return parts + [text[start:]]


def _expand_ranges(inside):
    """``01-03,07`` -> ``['01', '02', '03', '07']`` (zero padding of the lower bound kept)."""
    out = []
    for item in inside.split(","):
        m = _RANGE.match(item)
        if not m:
            raise ValueError(f"bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"decreasing range {item!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_host(pattern):
    """One host pattern (``x[1-2]-ib``, ``r[1-2]n[01-02]``) -> its hosts, the first bracket outermost."""
    parts = re.split(r"\[([^\[\]]*)\]", pattern)  # literal, inside, literal, inside, ..., literal
    if "[" in parts[-1] or "]" in parts[-1]:
        raise ValueError("unbalanced brackets")
    hosts = [parts[0]]
    for inside, literal in zip(parts[1::2], parts[2::2]):
        hosts = [h + n + literal for h in hosts for n in _expand_ranges(inside)]
    return hosts


def slurm_hostnames(nodelist, name="nodelist"):
    """Expand a SLURM nodelist (``node[01-03,07],gpu-a1``) into host names in order, as
    ``scontrol show hostnames`` does; ``name`` (the variable it came from) is named on error."""
    try:
        items = _split_top(nodelist.strip())
        if any(not item or item.startswith("[") for item in items):
            raise ValueError("empty host name")
        return [host for item in items for host in _expand_host(item)]
    except ValueError as exc:
        raise UserError(f"{name}={nodelist!r} is not a SLURM nodelist ({exc})") from None


def tasks_per_node(spec, name="SLURM_TASKS_PER_NODE"):
    """Expand SLURM's tasks-per-node format (``4(x2),3``) into one count per node: ``[4, 4, 3]``."""
    counts = []
    for item in spec.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
            raise UserError(f"{name}={spec!r}: expected counts like '4(x2),3'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _int(env, name, low=0):
    """``env[name]`` as an integer >= ``low``; missing or garbled is a one-line error naming it."""
    value = env.get(name)
    if value is None or value.strip() == "":
        raise UserError(f"{name} is not set (srun sets it for every task of a step)")
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        raise UserError(f"{name}={value!r}: expected an integer >= {low}")
    return number


def step_tasks(env):
    """Number of tasks of the ``srun`` step this process belongs to; 1 outside a step (the sbatch
    batch script itself is not a step)."""
    if not env.get("SLURM_STEP_ID"):
        return 1
    return _int(env, "SLURM_STEP_NUM_TASKS", low=1)


def master_addr(env):
    """Rendezvous host of an srun step: ``MASTER_ADDR`` if set, else the step's first node."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        if env.get(name):
            return slurm_hostnames(env[name], name)[0]
    raise UserError("SLURM_STEP_NODELIST is not set (nor SLURM_JOB_NODELIST, nor MASTER_ADDR): "
                    "cannot tell which host the ranks meet on")


def master_port(env):
    """Rendezvous port of an srun step: ``MASTER_PORT`` if set, else one port per job and step in
    [20000, 40000), the same for every task without any communication."""
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT", low=1)
        if port > 65535:
            raise UserError(f"MASTER_PORT={env['MASTER_PORT']!r}: expected a TCP port (1-65535)")
        return port
    job, step = _int(env, "SLURM_JOB_ID"), _int(env, "SLURM_STEP_ID")
    return 20000 + (job * 10 + step) % 20000


def _from_torchrun(env):
    return "RANK" in env and "WORLD_SIZE" in env and ("TORCHELASTIC_RUN_ID" in env or "GROUP_WORLD_SIZE" in env)


def process_env(env):
    """The torch.distributed variables this process still lacks before ``init_process_group("env://")``:
    all six for a task of a several-task srun step without torchrun (one task = one rank), else ``{}``."""
    tasks = step_tasks(env)
    if _from_torchrun(env):
        if tasks > 1 and env.get("GROUP_WORLD_SIZE") != str(tasks):
            raise UserError(
                f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS) each running its own torchrun: they would be "
                f"{tasks} independent runs writing into one OUTPUT; run one task per node with the scripts "
                f"(srun --ntasks-per-node=1 bash scripts/train_new.sh ...), or one task per GPU without torchrun")
        return {}
    if tasks == 1:
        return {}
    rank = _int(env, "SLURM_PROCID")
    if rank >= tasks:
        raise UserError(f"SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={tasks}")
    if env.get("WORLD_SIZE") not in (None, "", str(tasks)):
        raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is set, but srun started {tasks} tasks "
                        f"(SLURM_STEP_NUM_TASKS): unset WORLD_SIZE, each task is one rank")
    name = "SLURM_STEP_TASKS_PER_NODE" if env.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    if not env.get(name):
        raise UserError("SLURM_STEP_TASKS_PER_NODE is not set (nor SLURM_TASKS_PER_NODE): "
                        "cannot tell how many ranks share this node")
    counts = tasks_per_node(env[name], name)
    node = _int(env, "SLURM_NODEID") if len(counts) > 1 else 0
    if node >= len(counts):
        raise UserError(f"SLURM_NODEID={node} but {name}={env[name]!r} lists {len(counts)} nodes")
    local_rank = _int(env, "SLURM_LOCALID")
    if local_rank >= counts[node]:
        raise UserError(f"SLURM_LOCALID={local_rank} but {name}={env[name]!r} gives node {node} "
                        f"{counts[node]} tasks")
    return {"RANK": str(rank), "WORLD_SIZE": str(tasks), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(counts[node]), "MASTER_ADDR": master_addr(env),
            "MASTER_PORT": str(master_port(env))}


def main(argv=None, env=None):
    """``master``: "ADDR PORT" of the current srun step; ``hostnames NODELIST``: one host a line."""
    import os

    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    if argv == ["master"]:
        print(master_addr(env), master_port(env))
    elif len(argv) == 2 and argv[0] == "hostnames":
        print("\n".join(slurm_hostnames(argv[1])))
    else:
        raise UserError("usage: python -m advbct.world master | hostnames NODELIST")


if __name__ == "__main__":
    from advbct.cli import guarded

    guarded(main)()
