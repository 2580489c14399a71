"""The reproduction pipelines: the demo, a block of the paper's main table, the AdvBCT ablations.

Each pipeline is a plan, an ordered list of plain data (:mod:`advbct.pipelines.steps`): steps whose
commands are the release's bash entry points (scripts/train_old.sh, extract_meta.sh, train_new.sh,
test.sh) and tools, each skipped when its output exists (a training killed part-way through continues
from its last full epoch: :mod:`advbct.pipelines.training`), plus the data-provenance stamps
(:mod:`advbct.pipelines.stamps`). :func:`demo_steps` (:mod:`advbct.pipelines.demo`) and
:func:`table_steps` / :func:`ablation_steps` (:mod:`advbct.pipelines.blocks`) build the plans,
:func:`run_steps` runs one. The command line, as scripts/demo.sh, scripts/reproduce_table.sh and
scripts/reproduce_ablation.sh call it from the repository root::

    python -m advbct.pipelines demo
    python -m advbct.pipelines table {data,class} {r18,r50} [--synthetic PRESET] [--old-epoch N]
    python -m advbct.pipelines ablation [{data,class} {r18,r50}] [--synthetic PRESET] [--old-epoch N]

Adding a step: append a ``Step(name, output, command, log)`` to the plan where it belongs (e.g. in
:func:`table_steps` after the methods), its command an argv run from the repository root and its output
the file whose existence marks it done (written atomically by the command). A row of the main table is
a method registered with ``paper_row=True`` (advbct.losses.registry) and its config
``configs/<gldv2|synthetic>/<block>/<name>.yml``; a test set registered in advbct.evaluation.test_sets is
evaluated by every test step. Adding a block: a function returning ``prepare_steps(block)`` plus its own
steps (see :func:`ablation_steps`), and a command in ``advbct/pipelines/__main__.py``.
"""

from advbct.pipelines.blocks import (ABLATION_VARIANTS, Block, ablation_steps, block_steps, prepare_steps,
                                     pretrain_step, resolve_block, synthetic_overrides, table_steps)
from advbct.pipelines.demo import demo_steps
from advbct.pipelines.stamps import stamp_outputs
from advbct.pipelines.steps import EvalStep, Note, Stamp, Step, StepFailed, SyntheticList, run_steps

__all__ = ["ABLATION_VARIANTS", "Block", "EvalStep", "Note", "Stamp", "Step", "StepFailed", "SyntheticList",
           "ablation_steps", "block_steps", "demo_steps", "prepare_steps", "pretrain_step", "resolve_block",
           "run_steps", "stamp_outputs", "synthetic_overrides", "table_steps"]
