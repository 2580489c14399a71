"""torchrun for the bash scripts, with the error behaviour of a single process.

Rank 0 writes to the console (passed through unchanged, watched for an "error: " line); the stderr of the other ranks goes to files under LOG_DIR
(argv[1]) and is shown only when such a rank fails and the console has no error yet; torchrun's own
traceback is replaced by one line per crashed rank (named by its global rank); the exit status is the
failed rank's (2 = user error, 3 = non-finite loss), not torchrun's 1. On several nodes each node runs
this with its own LOG_DIR, where torchrun names the files by local rank.

    python -m advbct.launch LOG_DIR [torchrun arguments...]
"""

import glob
import logging
import os
import re
import signal
import sys
import threading


def _stderr_of(log_dir, local_rank):
    """Last stderr.log torchrun wrote for ``local_rank`` (this node's numbering) under ``log_dir``, as lines."""
    files = glob.glob(os.path.join(log_dir, "*", "attempt_*", str(local_rank), "stderr.log"))
    return open(max(files, key=os.path.getmtime), errors="replace").read().splitlines() if files else []


def _pump(read_fd, console, shown):
    """Forward bytes as they come (progress bars intact); note whether an ``error:`` line passed."""
    tail = b"\n"
    while chunk := os.read(read_fd, 65536):
        os.write(console, chunk)
        if re.search(rb"[\r\n]error: ", tail + chunk):  # after a newline or an erased progress bar
            shown.append(True)
        tail = chunk[-8:]


def run_torchrun(log_dir, args):
    """Run torchrun with ``args``; return the failed ranks as ``{global rank: (local rank, exit code)}``
    and whether an error line was shown."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    disabled = logging.root.manager.disable
    logging.disable(logging.ERROR)  # torchrun logs every failure at ERROR level; reported below instead
    console, (r, w) = os.dup(2), os.pipe()
    os.dup2(w, 2)  # the ranks inherit this pipe as their stderr
    os.close(w)
    shown = []
    thread = threading.Thread(target=_pump, args=(r, console, shown), daemon=True)
    thread.start()
    failed = {}
    try:
        torchrun(["--log-dir", log_dir] + args)
    except ChildFailedError as exc:
        failed = {rank: (f.local_rank, f.exitcode) for rank, f in exc.failures.items()}
    except (KeyboardInterrupt, SignalException):  # Ctrl-C / kill: torchrun has stopped the ranks
        failed = {0: (0, 130)}
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # closes the pipe: the pump ends once the ranks are gone
        thread.join(timeout=10)
        logging.disable(disabled)  # the caller's logging as it was (the launcher may run in a larger process)
    return failed, shown


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    log_dir, args = argv[0], argv[1:]
    failed, shown = run_torchrun(log_dir, args)
    codes = {rank: code for rank, (_, code) in failed.items()}
    if failed == {0: (0, 130)}:
        print("interrupted", file=sys.stderr)
        return 130
    user = [rank for rank in sorted(codes) if codes[rank] in (2, 3)]  # the tool printed one "error:" line
    for rank in sorted(codes):
        code, stderr = codes[rank], _stderr_of(log_dir, failed[rank][0])  # none for a rank on the console
        if code in (2, 3):
            message = [l for l in stderr if l.startswith("error: ")][-1:]
            if message and not shown:
                print(message[0], file=sys.stderr)
                shown.append(True)
        elif not (code < 0 and max(codes.values()) > 0):  # ranks torchrun stopped after a failure: silent
            if stderr:
                print("\n".join(stderr[-20:]), file=sys.stderr)
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            print(f"error: rank {rank} failed ({why})", file=sys.stderr)
    return codes[user[0]] if user else max(list(codes.values()) + [1]) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
