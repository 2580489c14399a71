"""Entry-point error handling: one line, exit 2, also for errors raised inside DataLoader workers."""

import subprocess
import sys
from pathlib import Path

import pytest

from advbct.errors import one_line

WORKER_ERROR = """
import torch
from advbct.cli import guarded
from advbct.errors import UserError

class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        raise UserError(f"img_{i}.jpg: cannot decode image")

@guarded
def main():
    for _ in torch.utils.data.DataLoader(Broken(), num_workers=1):
        pass

main()
"""


@pytest.mark.slow
def test_worker_error_reaches_the_user_as_one_line():
    proc = subprocess.run([sys.executable, "-c", WORKER_ERROR], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: img_0.jpg: cannot decode image"


def test_one_line_keeps_plain_messages():
    assert one_line("x.yml: unknown key") == "x.yml: unknown key"
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "a.py", line 1, in f\nadvbct.errors.UserError: a.jpg: unreadable')
    assert one_line(wrapped) == "a.jpg: unreadable"


def test_entry_point_synchronises_before_teardown_only_on_success(monkeypatch):
    """A finished run waits at a barrier before destroying the process group (a rank tearing gloo
    down while a peer still finishes can abort that peer); a failed run tears down without a
    collective, since its peers may never reach one."""
    from advbct import distributed
    from advbct.cli import config_main

    cfg_file = str(Path(__file__).resolve().parents[1] / "configs" / "test_model.yml")
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: "destroy" not in calls)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    assert config_main("ok", lambda cfg: 7, ["--cfg", cfg_file]) == 7
    assert calls == ["barrier", "destroy"]

    calls.clear()

    def fail(cfg):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        config_main("fails", fail, ["--cfg", cfg_file])
    assert calls == ["destroy"]
