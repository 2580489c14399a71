"""The training steps of a pipeline: continue a killed training, start over one made from other inputs.

A step whose command is a training (scripts/train_new.sh, scripts/train_old.sh: ``bash SCRIPT CONFIG.yml
[KEY VALUE ...]``) runs when its output (OUTPUT/final.pth) is missing, and tells the trainer what to do
with a run already in its OUTPUT, which the trainer refuses to replace unasked. One of two keys is always
added to its command:

- ``TRAIN.RESUME auto``: OUTPUT holds no run (a fresh run), or holds the run of a step killed part-way
  through whose inputs are the step's current ones (``[resume]``): the training continues from its
  ``last.pth``, the last full epoch.
- ``TRAIN.OVERWRITE true``: OUTPUT holds a run of other inputs, or of inputs not recorded (made by hand or
  before the record existed), or one without a ``last.pth`` to continue from: it starts over (``[redo]``,
  naming why), never silently.

The inputs of a training: its resolved config (the config file, its ``_BASE_`` files and the KEY VALUE
pairs; TRAIN.RESUME and TRAIN.OVERWRITE aside), the sha256 of every file the config names (train list,
pretrained backbone, old model, class meta) and the step's environment, recorded in ``OUTPUT/INPUTS.json``
before a run starts (not when it continues). A run is continued only when that record equals the current
inputs and its ``last.pth`` was written after the record: the checkpoint left by a restart that was killed
before the trainer had removed the previous run is not taken for the new run's.
"""

from __future__ import annotations

import json
import os
import re

from advbct.io import write_json_atomic
from advbct.pipelines.stamps import file_sha256

__all__ = ["INPUTS", "TRAIN_SCRIPTS", "is_training", "step_inputs", "training_keys"]

INPUTS = "INPUTS.json"
TRAIN_SCRIPTS = ("train_new.sh", "train_old.sh")
LAST = "last.pth"
_RUN_FILE = re.compile(r"^(last|final|epoch_\d+)\.pth$")   # the checkpoints of a run (the trainer's names)
_CONTROL = ("TRAIN.RESUME", "TRAIN.OVERWRITE")               # what this module adds: no input


def is_training(command) -> bool:
    """Whether ``command`` (an argv) runs a training through one of :data:`TRAIN_SCRIPTS`."""
    return (len(command) >= 3 and command[0] == "bash"
            and os.path.basename(str(command[1])) in TRAIN_SCRIPTS)


def step_inputs(argv, env=None):
    """``(OUTPUT, inputs)`` of the training ``argv`` runs (``bash SCRIPT CONFIG [KEY VALUE ...]``, from the
    repository root): its resolved config, the files it names with their sha256, ``env``."""
    from advbct.config import flat_config, load_config

    config = flat_config(load_config(argv[2], list(argv[3:])).to_dict())
    for key in _CONTROL:
        config.pop(key, None)
    files = {}
    for key, value in sorted(config.items()):
        if key != "OUTPUT" and isinstance(value, str) and value and os.path.isfile(value):
            files[key] = {"path": value, "sha256": file_sha256(value)}
    return config["OUTPUT"], {"config": config, "files": files, "env": dict(env or {})}


def _read_record(path):
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _changes(recorded, current):
    """What differs between two records of inputs, as short phrases (config keys, files, environment)."""
    changed = []
    was, now = recorded.get("config") or {}, current["config"]
    changed += [key for key in now if key in was and was[key] != now[key]]
    was_files, now_files = recorded.get("files") or {}, current["files"]
    for key in sorted(set(was_files) | set(now_files)):
        if key in changed:
            continue
        if (was_files.get(key) or {}).get("sha256") != (now_files.get(key) or {}).get("sha256"):
            changed.append(f"the file of {key}")
    if (recorded.get("env") or {}) != current["env"]:
        changed.append("the environment")
    return changed


def _listed(items, most=3):
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def training_keys(argv, env=None):
    """The key the training ``argv`` is started with, ``("TRAIN.RESUME", "auto")`` or
    ``("TRAIN.OVERWRITE", "true")``, and why (None for a fresh run); records its inputs in
    ``OUTPUT/INPUTS.json`` unless it continues a run (see the module's docstring)."""
    out, inputs = step_inputs(argv, env)
    if os.path.exists(out) and not os.path.isdir(out):
        return ("TRAIN.RESUME", "auto"), None  # the trainer refuses it, in one line
    record = os.path.join(out, INPUTS)
    recorded = _read_record(record)
    try:
        runs = sorted(n for n in os.listdir(out) if _RUN_FILE.match(n))
    except (FileNotFoundError, NotADirectoryError):
        runs = []
    last = os.path.join(out, LAST)
    if runs and recorded is not None and not _changes(recorded, inputs) and os.path.isfile(last) \
            and os.stat(last).st_mtime_ns >= os.stat(record).st_mtime_ns:
        return ("TRAIN.RESUME", "auto"), f"the run in {out} continues from its {LAST}"
    if recorded != inputs:
        write_json_atomic(record, inputs)  # (creates OUTPUT)
    if not runs:
        return ("TRAIN.RESUME", "auto"), None  # nothing to continue: a fresh run
    if recorded is None:
        why = f"made from inputs it has no record of ({INPUTS})"
    elif changes := _changes(recorded, inputs):
        why = f"made from other inputs ({_listed(changes)} changed)"
    elif not os.path.isfile(last):
        why = f"without a {LAST} to continue from"
    else:
        why = "older than the record of its inputs (a restart of it was interrupted)"
    return ("TRAIN.OVERWRITE", "true"), f"{out} holds a run {why}: starting over"
