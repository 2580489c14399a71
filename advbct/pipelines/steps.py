"""Resumable steps: the items of a pipeline's plan and ``run_steps``, which runs them in order.

A plan is a list of plain data:

- :class:`Step`: a command (an argv list, run from the repository root, never through a shell: a path
  with spaces, quotes or ``$`` in it stays one argument) whose ``output`` marks it done. A step whose
  output exists is skipped (``[done] NAME  (OUTPUT)``; every output is written atomically, so existing
  means complete); otherwise it runs (``[run]  NAME  (log: LOG)``) with its output shown and kept in
  ``log``. A failing step stops the run in one line, ``error: step 'NAME' failed; log: LOG`` (exit status
  1), as does a step that ends without writing its output; the steps completed before it stay as they are.
  A step without ``output`` always runs, its output shown only (the tables at the end). A training (a
  command of scripts/train_new.sh or train_old.sh) killed part-way through continues from its last full
  epoch when the pipeline runs again (``[resume] NAME``, its log continued), or starts over, explicitly,
  where its inputs changed since (``[redo] NAME``): :mod:`advbct.pipelines.training`.
- :class:`EvalStep`: a new model tested against the old one on every test set whose results are missing,
  all in one ``scripts/test.sh`` process (one set per process where a root holds a comma, which
  scripts/test.sh reads as the separator of the sets' roots).
- :class:`Stamp`: the output folders keyed on the data they are built from (:mod:`advbct.pipelines.stamps`).
- :class:`SyntheticList`: a synthetic benchmark's full train list, read from its ``SYNTHETIC.json`` when
  the plan reaches it (a benchmark of another format version stops the run there, in one line) and when a
  step that names it in its command runs.
- :class:`Note`: a line printed when the plan reaches it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

from advbct.errors import UserError
from advbct.pipelines.training import is_training, training_keys

__all__ = ["EvalStep", "Note", "Stamp", "Step", "StepFailed", "SyntheticList", "run_steps"]


class StepFailed(UserError):
    """A step's command failed or did not write its output; the message names the step and its log."""

    exit_code = 1


@dataclass(frozen=True)
class SyntheticList:
    """The full GLDv2 train list of the synthetic benchmark in ``data`` (a tools/make_synthetic.py output
    folder), ``DATA/<its SYNTHETIC.json's gldv2.train_list>``; known once the benchmark exists."""

    data: str

    def resolve(self) -> str:
        from advbct.data.synthetic import read_summary

        return f"{self.data}/{read_summary(self.data)['gldv2']['train_list']}"

    def __str__(self):
        return f"{self.data}/<train list of {self.data}/SYNTHETIC.json>"


def _arg(value) -> str:
    return value.resolve() if isinstance(value, SyntheticList) else str(value)


@dataclass(frozen=True)
class Step:
    """``command`` (run from the repository root, ``env`` added to the environment) unless ``output``
    exists; its console output kept in ``log``. ``output`` None: it always runs, its output only shown,
    announced as ``[run]  NAME`` (a step without ``name`` runs silently)."""

    name: str | None
    output: str | None
    command: tuple
    log: str | None = None
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "command", tuple(self.command))

    def argv(self) -> list[str]:
        """The command with a :class:`SyntheticList` in it resolved (it reads the benchmark's summary)."""
        return [_arg(a) for a in self.command]


@dataclass(frozen=True)
class EvalStep:
    """``new`` (architecture ``arch``) tested against ``old`` on every set of ``test_sets`` whose
    ``eval_dir/<set>/results.json`` is missing, all in one scripts/test.sh process (the models are
    loaded once, each set's results written as it is scored); ``roots``: the root of each set, in the
    order of ``test_sets``; ``options``: KEY VALUE pairs after the sets and roots."""

    name: str
    new: str
    arch: str
    old: str
    eval_dir: str
    log: str
    test_sets: tuple
    roots: tuple
    options: tuple = ()

    def __post_init__(self):
        for name in ("test_sets", "roots", "options"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def results(self) -> list[str]:
        return [f"{self.eval_dir}/{s}/results.json" for s in self.test_sets]

    def step(self, missing=None) -> Step | None:
        """The step testing the sets whose results are missing now (``missing``: those sets instead); None
        when none is. Where a root of them holds a comma, the first of them alone (EVAL.ROOT of one set is
        taken whole): :func:`run_steps` then calls this again until every set has its results."""
        if missing is None:
            missing = [s for s, path in zip(self.test_sets, self.results()) if not os.path.exists(path)]
        todo = [s for s in self.test_sets if s in missing]
        if not todo:
            return None
        if any("," in r for s, r in zip(self.test_sets, self.roots) if s in todo):
            todo = todo[:1]
        roots = [r for s, r in zip(self.test_sets, self.roots) if s in todo]
        # one set alone writes SAVE_DIR/results.json, several write SAVE_DIR/<set>/results.json
        save = self.eval_dir if len(todo) > 1 else f"{self.eval_dir}/{todo[0]}"
        return Step(f"{self.name} on {','.join(todo)}", f"{self.eval_dir}/{todo[-1]}/results.json",
                    ("bash", "scripts/test.sh", "landmark", ",".join(todo), ",".join(roots), *self.options,
                     "EVAL.SAVE_DIR", save),
                    self.log, {"NEW_MODEL_PATH": self.new, "OLD_MODEL_PATH": self.old, "NEW_MODEL_ARCH": self.arch})


@dataclass(frozen=True)
class Stamp:
    """Key each folder of ``dirs`` on ``source`` (see :func:`advbct.pipelines.stamps.stamp_outputs`)."""

    source: str
    dirs: tuple

    def __post_init__(self):
        object.__setattr__(self, "dirs", tuple(self.dirs))


@dataclass(frozen=True)
class Note:
    text: str


def _flush():
    sys.stdout.flush()
    sys.stderr.flush()


def _show(chunk: bytes, decoder):
    """Write a chunk of a command's output to the console as it came (bytes where the console takes them)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(chunk)
        buffer.flush()
    else:
        sys.stdout.write(decoder.decode(chunk))
        sys.stdout.flush()


def _environment(step: Step):
    return {**os.environ, **step.env} if step.env else None


def _run_logged(step: Step, argv: list, append=False) -> int:
    """Run ``argv`` (the step's command), its output (stdout and stderr together) shown and written to the
    step's log (``append``: after what the log holds, e.g. the output of the attempt a resumed step
    continues)."""
    import codecs

    os.makedirs(os.path.dirname(step.log) or ".", exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(step.log, "ab" if append else "wb") as log:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=_environment(step))
        except OSError as exc:
            message = f"{step.command[0]}: {exc.strerror or exc}\n".encode()
            log.write(message)
            _show(message, decoder)
            return 127
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                _show(chunk, decoder)
            return proc.wait()
        except BaseException:
            # (Ctrl-C reaches the command too: it is in the same process group) let it end, then stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            proc.stdout.close()


def run_step(step: Step):
    """Run one :class:`Step` (see the module's docstring)."""
    if step.output is None:
        if step.name:
            print(f"[run]  {step.name}", flush=True)
        _flush()
        argv = step.argv()
        if is_training(argv):  # (no plan has such a step: a training is done when its final.pth exists)
            argv += training_keys(argv, step.env)[0]
        rc = subprocess.run(argv, env=_environment(step)).returncode
        if rc != 0:
            raise SystemExit(rc)
        return
    if os.path.exists(step.output):
        print(f"[done] {step.name}  ({step.output})", flush=True)
        return
    argv, line, resumed = step.argv(), f"[run]  {step.name}  (log: {step.log})", False
    if is_training(argv):  # every training says what becomes of a run already in its OUTPUT
        try:
            keys, why = training_keys(argv, step.env)
        except UserError as exc:  # its config: refused before the trainer starts
            raise UserError(f"step '{step.name}': {exc}") from None
        argv += keys
        if why:
            resumed = keys[0] == "TRAIN.RESUME"
            line = f"{'[resume]' if resumed else '[redo]'} {step.name}  (log: {step.log}; {why})"
    print(line, flush=True)
    if _run_logged(step, argv, append=resumed) != 0:
        raise StepFailed(f"step '{step.name}' failed; log: {step.log}")
    if not os.path.exists(step.output):
        raise StepFailed(f"step '{step.name}' ended without writing {step.output}; log: {step.log}")


def run_steps(plan):
    """Run the items of ``plan`` in order, from the current folder (the repository root). A failing step
    raises :class:`StepFailed` (exit status 1 through ``advbct.cli.guarded``), a refusal (stale data, a
    benchmark of another format) a :class:`~advbct.errors.UserError`; a step without output that fails
    exits with its command's status."""
    from advbct.pipelines.stamps import stamp_outputs

    for item in plan:
        if isinstance(item, Step):
            run_step(item)
        elif isinstance(item, EvalStep):
            step = item.step()
            if step is None:
                print(f"[done] {item.name}  ({item.eval_dir}/{{{','.join(item.test_sets)}}}/results.json)",
                      flush=True)
            while step is not None:  # (one call, or one per set: see EvalStep.step)
                run_step(step)
                step = item.step()
        elif isinstance(item, Stamp):
            stamp_outputs(item.source, item.dirs)
        elif isinstance(item, SyntheticList):
            item.resolve()
        elif isinstance(item, Note):
            print(item.text, flush=True)
        else:
            raise TypeError(f"not a pipeline item: {item!r}")
