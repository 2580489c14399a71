"""Entry-point error handling: one line, exit 2, also for errors raised inside DataLoader workers."""

from pathlib import Path

import pytest

from advbct.errors import UserError, one_line
from helpers import call_main

class Broken:
    """A dataset whose every item fails as an undecodable image does (a UserError raised in the worker)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise UserError(f"img_{i}.jpg: cannot decode image")


def test_worker_error_reaches_the_user_as_one_line(capfd):
    """A guarded entry point reading a DataLoader whose worker process (forked from this one) raises: the
    user sees the worker's message alone, on one line, and exit status 2."""
    import torch

    from advbct.cli import guarded

    @guarded
    def main(argv):
        batches = iter(torch.utils.data.DataLoader(Broken(), num_workers=1))
        try:
            for _ in batches:
                pass
        finally:  # an entry point's process ends here; in this one, a garbage collection would wait 5 s for it
            batches._shutdown_workers()

    proc = call_main(main, [], capfd)
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
