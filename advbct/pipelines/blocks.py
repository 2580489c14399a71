"""The plans of a block of the paper's main table and of the AdvBCT ablations (scripts/reproduce_table.sh,
scripts/reproduce_ablation.sh).

A block is an allocation (``data``: 30 % of the images of every class, ``class``: 30 % of the classes)
and a new backbone (``r18``, ``r50``), on the real datasets (Dataset.md) or on a synthetic benchmark
(``preset``). Both plans share their first steps (:func:`prepare_steps`): on the synthetic route the
benchmark and the pretrained backbones (the stand-in for ImageNet weights), then the split, the old
R18 (shared by the r18 and r50 blocks of an allocation), its class meta and phi*. The table trains every
method of :func:`_table_methods` and tests each model against the old one; the ablation trains the
:data:`ABLATION_VARIANTS` of AdvBCT.

Every step's command is one of the release's bash entry points (scripts/train_old.sh, extract_meta.sh,
train_new.sh, test.sh) or a tool (tools/*.py) with the block's config and KEY VALUE overrides; the plan
is plain data (:mod:`advbct.pipelines.steps`), run by :func:`advbct.pipelines.steps.run_steps`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from advbct.errors import UserError
from advbct.pipelines.steps import EvalStep, Note, Stamp, Step, SyntheticList

__all__ = ["ABLATION_USAGE", "ABLATION_VARIANTS", "ALLOCATIONS", "BACKBONES", "Block", "TABLE_USAGE",
           "UsageError", "ablation_steps", "block_steps", "old_checkpoint_name",
           "parse_block_args", "prepare_steps", "pretrain_step", "resolve_block", "set_roots",
           "synthetic_overrides", "table_steps"]

TABLE_USAGE = "usage: bash scripts/reproduce_table.sh {data,class} {r18,r50} [--synthetic PRESET] [--old-epoch N]"
ABLATION_USAGE = ("usage: bash scripts/reproduce_ablation.sh [{data,class} {r18,r50}] [--synthetic PRESET] "
                  "[--old-epoch N]")
ALLOCATIONS = ("data", "class")
BACKBONES = ("r18", "r50")
OLD_RATIO = "0.3"

# the ablation rows: (name, table label, KEY VALUE overrides of the block's advbct.yml). Each label goes to
# tools/collect_results.py as --method LABEL=FOLDER: no '=' in it
ABLATION_VARIANTS = (
    ("advbct", "AdvBCT (block config)", ()),
    ("advbct_no_adv", "w/o adversarial", ("COMP_LOSS.ADVERSARIAL", "false")),
    ("advbct_no_elastic", "w/o elastic boundary (fixed r_min)", ("COMP_LOSS.ELASTIC", "false")),
    ("advbct_T0.4", "T 0.4", ("COMP_LOSS.THRESHOLD", "0.4")),
    ("advbct_T0.6", "T 0.6", ("COMP_LOSS.THRESHOLD", "0.6")),
    ("advbct_T0.8", "T 0.8", ("COMP_LOSS.THRESHOLD", "0.8")),
    ("advbct_T1.0", "T 1.0", ("COMP_LOSS.THRESHOLD", "1.0")),
    ("advbct_T1.2", "T 1.2", ("COMP_LOSS.THRESHOLD", "1.2")),
)


def _table_methods():
    """The rows of the paper's table a block trains, in table order: ``[(config name, table label)]`` (the
    config is ``<block configs>/<name>.yml``, the label the row's name in table.{md,json}), from the method
    registry (advbct.losses.registry: the methods declared as rows of the paper's table)."""
    from advbct.losses.registry import labels, list_methods

    names = labels()
    return [(name, names[name]) for name in list_methods(paper_rows=True)]


def _test_sets():
    """The test sets every model is evaluated on, in the table's column order (advbct.evaluation.test_sets)."""
    from advbct.evaluation import test_sets

    return list(test_sets.names())


def set_roots(data=None):
    """``((test set, root), ...)`` of :func:`_test_sets`: the real layout's roots (Dataset.md), or with
    ``data`` the sets' folders in that synthetic benchmark."""
    from advbct.evaluation import test_sets

    specs = [test_sets.get(name) for name in _test_sets()]
    if data is None:
        return tuple((s.name, s.default_root) for s in specs)
    return tuple((s.name, f"{data}/{s.synthetic_root}") for s in specs)


def _check_block(alloc, backbone):
    if alloc not in ALLOCATIONS:
        raise UserError(f"unknown allocation '{alloc}' (expected data or class)")
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{backbone}' (expected r18 or r50)")


class UsageError(UserError):
    """Too few arguments: the usage line alone, exit status 2."""


def parse_block_args(argv, usage=TABLE_USAGE):
    """``ALLOC BACKBONE [--synthetic PRESET] [--old-epoch N]`` -> (alloc, backbone, preset or None,
    old_epoch or None); a mistake is a one-line UserError (:class:`UsageError`: the usage line alone)."""
    argv = list(argv)
    if len(argv) < 2:
        raise UsageError(usage)
    alloc, backbone, rest = argv[0], argv[1], argv[2:]
    preset = old_epoch = None
    while rest:
        arg = rest.pop(0)
        if arg == "--synthetic":
            preset = rest.pop(0) if rest else ""
            if not preset:
                raise UserError("--synthetic needs a preset (tiny, small, medium)")
            from advbct.data.synthetic import PRESETS  # numpy and PIL: only for the synthetic blocks
            if preset not in PRESETS:
                raise UserError(f"--synthetic {preset}: expected one of {', '.join(PRESETS)}")
        elif arg == "--old-epoch":
            old_epoch = rest.pop(0) if rest else ""
            if not old_epoch:
                raise UserError("--old-epoch needs an epoch (e.g. 10, as the release)")
        else:
            raise UserError(f"unknown argument '{arg}'; {usage}")
    _check_block(alloc, backbone)
    return alloc, backbone, preset, old_epoch


def old_checkpoint_name(old_config, epoch, train):
    """The checkpoint the old model's training (``train``: the TRAIN node of ``old_config``, loaded) leaves
    for ``epoch`` (a string, as given on the command line): final.pth for its last epoch, epoch_N.pth every
    TRAIN.SAVE_FREQ epochs; any other epoch is a UserError listing the epochs it keeps."""
    kept = sorted(set(range(train.SAVE_FREQ, train.EPOCHS + 1, train.SAVE_FREQ)) | {train.EPOCHS})
    if not epoch.isdigit() or int(epoch) not in kept:
        raise UserError(f"--old-epoch {epoch}: the old model ({old_config}) keeps the checkpoints of epochs "
                        f"{', '.join(map(str, kept))} (TRAIN.SAVE_FREQ {train.SAVE_FREQ}, TRAIN.EPOCHS {train.EPOCHS})")
    return "final.pth" if int(epoch) == train.EPOCHS else f"epoch_{int(epoch)}.pth"


def synthetic_overrides(data, alloc):
    """The config overrides that point the synthetic configs at ``data`` (a make_synthetic.py output folder)."""
    return ("DATA.ROOT", f"{data}/gldv2",
            "DATA.TRAIN_LIST", f"{data}/gldv2/gldv2_train_new_100percent_{alloc}.txt",
            "META.TRAIN_LIST", f"{data}/gldv2/gldv2_train_old_30percent_{alloc}.txt",
            "EVAL.ROOT", f"{data}/ROxfordParis")


def pretrain_step(backbone, data, out, log, *overrides, prefix=""):
    """The step training the synthetic stand-in for ImageNet weights (configs/synthetic/pretrain_<bb>.yml:
    a classifier on DATA/pretrain, landmarks disjoint from every other part) into OUT/final.pth; ``prefix``
    (e.g. "2/9 ") numbers the step in the console."""
    return Step(f"{prefix}pretrain backbone ({backbone}, {data}/pretrain)", f"{out}/final.pth",
                ("bash", "scripts/train_new.sh", f"configs/synthetic/pretrain_{backbone}.yml",
                 "DATA.ROOT", f"{data}/pretrain", "DATA.TRAIN_LIST", f"{data}/pretrain/train_list.txt",
                 "OUTPUT", out, *overrides), log)


@dataclass(frozen=True)
class Block:
    """A block's paths and settings, resolved (:func:`resolve_block`)."""

    alloc: str
    backbone: str
    preset: str | None
    old_epoch: str | None
    data: str             # the synthetic benchmark, or the real GLDv2 folder
    cfg: str              # the folder of the block's configs (<row>.yml)
    tag: str              # "_synthetic-<preset>" or ""
    roots: tuple          # ((test set, root), ...) in table order
    data_opts: tuple      # KEY VALUE of every training / meta command
    eval_opts: tuple      # KEY VALUE of every test command
    pretrain_root: str | None
    old_init: tuple
    new_init: tuple
    old_cfg: str
    old_dir: str          # shared by the r18 and r50 blocks of one allocation
    old: str              # the old checkpoint the compatible rows train against and are tested with
    meta: str
    out: str
    new_arch: str
    old_arch: str
    full_list: object     # the full train list: a path, or a SyntheticList
    list_dir: str         # where the split writes the old / new lists

    @property
    def name(self):
        return f"{self.alloc}_{self.backbone}"

    @property
    def paper_block(self):
        """The block's key in the paper's table (paper_table.json)."""
        return self.alloc if self.backbone == "r18" else f"backbone-{self.alloc}"

    @property
    def logs(self):
        return f"{self.out}/logs"

    @property
    def compat(self):
        return ("OLD_MODEL.WEIGHTS", self.old, "COMP_LOSS.META_PATH", self.meta)


def _real_data_files(data, revisited_root, gldv2_root):
    return (f"{data}/label_81313.txt", f"{revisited_root}/gnd_roxford5k.pkl", f"{revisited_root}/gnd_rparis6k.pkl",
            f"{gldv2_root}/gldv2_private_query_gt.txt")


def resolve_block(alloc, backbone, preset=None, old_epoch=None, data=None):
    """The :class:`Block` of ``alloc`` x ``backbone``: on the real datasets (``preset`` None; their files
    must be laid out as in Dataset.md) or on the synthetic benchmark ``preset`` in ``data`` (default
    ./data/synthetic-<preset>); ``old_epoch`` (a string): the compatible rows use the old model's
    checkpoint of that epoch instead of its final one, with their own meta and output folder. Reads the
    configs (architectures, the old model's schedule); a mistake is a one-line UserError."""
    from advbct.config import load_config

    _check_block(alloc, backbone)
    name = f"{alloc}_{backbone}"
    if preset:
        cfg = f"configs/synthetic/{name}"
        data = data or f"./data/synthetic-{preset}"
        tag = f"_synthetic-{preset}"
        roots = set_roots(data)
        data_opts = synthetic_overrides(data, alloc)
        eval_opts = ("EVAL.IMG_SIZE", "64", "EVAL.NUM_WORKERS", "1", "EVAL.BATCH_SIZE", "128")
        # the stand-in for ImageNet weights: one pretrained backbone per architecture, shared by every block
        pretrain_root = f"./output/reproduce/pretrain{tag}"
        old_init = ("MODEL.PRETRAINED_PATH", f"{pretrain_root}/r18/final.pth")
        new_init = ("MODEL.PRETRAINED_PATH", f"{pretrain_root}/{backbone}/final.pth")
        full_list, list_dir = SyntheticList(data), f"{data}/gldv2"
    else:
        cfg = f"configs/gldv2/{name}"
        data, tag = "./data/GLDv2", ""
        roots = set_roots()
        data_opts = eval_opts = old_init = new_init = ()  # ImageNet weights from the torch hub cache
        pretrain_root = None
        for need in _real_data_files(data, "./data/ROxfordParis", "./data/GLDv2"):
            if not os.path.exists(need):
                raise UserError(f"{need} not found: lay out the datasets as in Dataset.md (or use --synthetic PRESET)")
        full_list = f"{data}/label_81313.txt"
        list_dir = os.path.dirname(full_list)
    old_cfg = f"configs/{os.path.basename(os.path.dirname(cfg))}/{alloc}_r18/old.yml"
    old_dir = f"./output/reproduce/old_{alloc}{tag}"
    # Which old model the compatible rows train against and are tested with: by default the final one (the
    # paper's protocol), with old_epoch its checkpoint of that epoch (the release's compatible configs load
    # epoch 10), which the old model's training keeps; such a block gets its own meta and output folder.
    old_config = load_config(old_cfg, list(data_opts))
    old, meta, old_tag = f"{old_dir}/final.pth", f"{old_dir}/meta.pt", ""
    if old_epoch:
        checkpoint = old_checkpoint_name(old_cfg, old_epoch, old_config.TRAIN)
        old = f"{old_dir}/{checkpoint}"
        if checkpoint != "final.pth":
            meta, old_tag = f"{old_dir}/meta_epoch{old_epoch}.pt", f"_old-epoch{old_epoch}"
    out = f"./output/reproduce/{name}{tag}{old_tag}"
    new_arch = str(load_config(f"{cfg}/independent.yml").MODEL.ARCH)
    old_arch = str(old_config.MODEL.ARCH)
    return Block(alloc=alloc, backbone=backbone, preset=preset or None, old_epoch=old_epoch or None, data=data,
                 cfg=cfg, tag=tag, roots=roots, data_opts=data_opts, eval_opts=eval_opts, pretrain_root=pretrain_root,
                 old_init=old_init, new_init=new_init, old_cfg=old_cfg, old_dir=old_dir, old=old, meta=meta, out=out,
                 new_arch=new_arch, old_arch=old_arch, full_list=full_list, list_dir=list_dir)


def prepare_steps(block, python=None):
    """The steps every block plan starts with: (synthetic benchmark, its check, the provenance stamps, the
    pretrained backbones) or (the stamps), then the split, the old model, its class meta and phi*."""
    py = python or sys.executable
    b, steps = block, []
    if b.preset:
        source = f"{b.data}/SYNTHETIC.json"
        steps += [Step(f"synthetic benchmark ({b.preset})", source, (py, "tools/make_synthetic.py", "--out", b.data,
                                                                      "--preset", b.preset), f"{b.logs}/synthetic.log"),
                  b.full_list,  # a benchmark of another format version stops the run here
                  Stamp(source, (b.pretrain_root, b.old_dir, b.out)),
                  pretrain_step("r18", b.data, f"{b.pretrain_root}/r18", f"{b.logs}/pretrain_r18.log")]
        if b.backbone != "r18":
            steps.append(pretrain_step(b.backbone, b.data, f"{b.pretrain_root}/{b.backbone}",
                                       f"{b.logs}/pretrain_{b.backbone}.log"))
    else:
        steps.append(Stamp(b.full_list, (b.old_dir, b.out)))
    steps += [
        Step(f"split by {b.alloc} (30 % old)", f"{b.list_dir}/gldv2_train_new_100percent_{b.alloc}.txt",
             (py, "tools/split_dataset.py", "--list", b.full_list, "--by", b.alloc, "--ratio", OLD_RATIO),
             f"{b.logs}/split.log"),
        Step(f"old model (R18, {b.alloc} allocation)", f"{b.old_dir}/final.pth",
             ("bash", "scripts/train_old.sh", b.old_cfg, *b.data_opts, *b.old_init,
              "DATA.TRAIN_LIST", f"{b.list_dir}/gldv2_train_old_30percent_{b.alloc}.txt", "OUTPUT", b.old_dir),
             f"{b.logs}/old.log"),
        Step("old-class meta", b.meta, ("bash", "scripts/extract_meta.sh", f"{b.cfg}/advbct.yml", *b.data_opts,
                                        *b.compat), f"{b.logs}/meta.log"),
        Step(f"phi* ({b.backbone})", f"{b.out}/independent/final.pth",
             ("bash", "scripts/train_new.sh", f"{b.cfg}/independent.yml", *b.data_opts, *b.new_init,
              "OUTPUT", f"{b.out}/independent"), f"{b.logs}/independent.log"),
    ]
    return steps


def evaluate_step(block, model, new=None, transform=None):
    """Self/cross/backfill of OUT/MODEL/final.pth (or the checkpoint ``new``) against the old model on every test
    set, in one process, into OUT/eval/MODEL; the old model's features are embedded by the first model tested
    and read back by the others; ``transform``: the EVAL.OLD_TRANSFORM mapping the old gallery (FCT)."""
    b = block
    mapped = ("EVAL.OLD_TRANSFORM", transform) if transform else ()
    return EvalStep(f"test {model}", new or f"{b.out}/{model}/final.pth", b.new_arch, b.old,
                    f"{b.out}/eval/{model}", f"{b.logs}/test_{model}.log", tuple(s for s, _ in b.roots),
                    tuple(r for _, r in b.roots),
                    (*b.eval_opts, "OLD_MODEL.ARCH", b.old_arch, "EVAL.BACKFILL", "true",
                     "EVAL.BACKFILL_UNITS", "[image,batch,most_changed]",  # the refresh orders side by side
                     "EVAL.OLD_FEATURES_CACHE", f"{b.out}/eval/old_features", *mapped))


def _later_methods(block):
    """The rows after the paper's on a synthetic block: the registered methods that are no row of the paper's
    table and have a config in the block's folder, ``[(row name, label, needs a transformation)]``; a method
    that needs a transformation (FCT) also gets the row ``<name>_procrustes`` where that config exists."""
    if not block.preset:
        return []
    from advbct.config import load_config
    from advbct.losses.build import needs_transformation
    from advbct.losses.registry import labels, list_methods

    paper, names = set(list_methods(paper_rows=True)), labels()
    rows = []
    for name in list_methods():
        config = f"{block.cfg}/{name}.yml"
        if name in paper or not os.path.isfile(config):
            continue
        mapped = needs_transformation(load_config(config).COMP_LOSS)
        rows.append((name, names[name], mapped))
        if mapped and os.path.isfile(f"{block.cfg}/{name}_procrustes.yml"):
            rows.append((f"{name}_procrustes", f"{names[name]} (Procrustes)", True))
    return rows


def _later_training(block, name):
    """The steps that train later method NAME's new model: first, for a method whose class meta covers every
    training class (BT²), that meta (scripts/extract_meta.sh embeds DATA.TRAIN_LIST) into OUT/NAME_meta.pt;
    a method that reads a teacher's embeddings gets φ* (OUT/independent/final.pth) as its teacher."""
    from advbct.losses.registry import get_method

    b, method, steps, overrides = block, get_method(name), [], []
    config = f"{b.cfg}/{name}.yml"
    if method.meta_classes == "train":
        meta = f"{b.out}/{name}_meta.pt"
        steps.append(Step(f"{name} class means ({b.backbone})", meta,
                          ("bash", "scripts/extract_meta.sh", config, *b.data_opts, *b.compat,
                           "COMP_LOSS.META_PATH", meta), f"{b.logs}/{name}_meta.log"))
        overrides += ["COMP_LOSS.META_PATH", meta]
    if method.teacher_key:
        overrides += [f"COMP_LOSS.{method.teacher_key}", f"{b.out}/independent/final.pth"]
    return steps + [new_model_step(b, name, config, *overrides)]


def _later_steps(block, rows):
    """Train each later method's new model, fit the transformations, test each row (with its transformation
    where it has one). A method that needs a transformation (FCT) trains its new model with no term and no old
    model, which is φ*, trained already (:func:`prepare_steps`): its rows map the old gallery into φ*'s space."""
    b, steps, tests = block, [], []
    for name, _, mapped in rows:
        new, transform = f"{b.out}/{name}/final.pth", None
        if mapped:
            new, transform = f"{b.out}/independent/final.pth", f"{b.out}/{name}/transformation.pth"
            steps.append(Step(f"{name} transformation ({b.backbone})", transform,
                              ("bash", "scripts/train_transformation.sh", f"{b.cfg}/{name}.yml", *b.data_opts,
                               *b.compat, "NEW_MODEL.WEIGHTS", new, "NEW_MODEL.ARCH", b.new_arch,
                               "OUTPUT", f"{b.out}/{name}"), f"{b.logs}/{name}_transformation.log"))
        else:
            steps += _later_training(b, name)
        tests.append(evaluate_step(b, name, new=new, transform=transform))
    return steps + tests


def new_model_step(block, name, config, *overrides):
    """Train the new model NAME from ``config`` (a compatible one: against the block's old model and meta)."""
    b = block
    return Step(f"{name} ({b.backbone})", f"{b.out}/{name}/final.pth",
                ("bash", "scripts/train_new.sh", config, *b.data_opts, *b.new_init, *b.compat, *overrides,
                 "OUTPUT", f"{b.out}/{name}"), f"{b.logs}/{name}.log")


def table_steps(block, python=None):
    """The plan of scripts/reproduce_table.sh: :func:`prepare_steps`, every method of :func:`_table_methods`,
    the tests of phi* and of each method, on a synthetic block the rows of :func:`_later_methods`, then table.{md,json} (tools/collect_results.py, beside the paper's
    numbers on the real datasets when ../shared/data/paper_table.json exists) and backfill.{json,png}."""
    py = python or sys.executable
    b, methods = block, _table_methods()
    steps = prepare_steps(b, py)
    steps += [new_model_step(b, m, f"{b.cfg}/{m}.yml") for m, _ in methods]
    steps += [evaluate_step(b, model) for model in ("independent", *(m for m, _ in methods))]
    later = _later_methods(b)  # synthetic blocks: the methods published after AdvBCT, as extra rows
    steps += _later_steps(b, later)
    method_args = [a for m, label, *_ in (*methods, *later) for a in ("--method", f"{label}={b.out}/eval/{m}")]
    reference = "../shared/data/paper_table.json"
    ref_args = ["--reference", reference] if not b.preset and os.path.isfile(reference) else []
    steps += [Step("table", None, (py, "tools/collect_results.py", "--independent", f"{b.out}/eval/independent",
                                   *method_args, "--block", b.paper_block, "--description", f"{b.name}{b.tag}",
                                   "--out", f"{b.out}/table.json", "--markdown", f"{b.out}/table.md",
                                   "--criterion", *ref_args)),
              Step(None, None, (py, "tools/plot_backfill.py", "--eval-dir", f"{b.out}/eval", "--out",
                                f"{b.out}/backfill"))]
    return steps


def ablation_steps(block, python=None):
    """The plan of scripts/reproduce_ablation.sh: :func:`prepare_steps`, each of :data:`ABLATION_VARIANTS`
    trained and tested (the T row equal to the block's own threshold is the block's AdvBCT model: reused,
    not retrained), phi*'s test, then ablation.{md,json}."""
    from advbct.config import load_config

    py = python or sys.executable
    b = block
    steps = prepare_steps(b, py)
    threshold = load_config(f"{b.cfg}/advbct.yml").COMP_LOSS.THRESHOLD
    same_t = {n for n, _, _ in ABLATION_VARIANTS
              if n.startswith("advbct_T") and float(n[len("advbct_T"):]) == threshold}
    method_args = []
    for name, label, overrides in ABLATION_VARIANTS:
        if name in same_t:
            steps.append(Note(f"[same] {name} ({b.backbone}) is the block's AdvBCT: reusing {b.out}/eval/advbct"))
            method_args += ["--method", f"{label}={b.out}/eval/advbct"]
            continue
        steps += [new_model_step(b, name, f"{b.cfg}/advbct.yml", *overrides), evaluate_step(b, name)]
        method_args += ["--method", f"{label}={b.out}/eval/{name}"]
    steps += [evaluate_step(b, "independent"),
              Step("ablation table", None, (py, "tools/collect_results.py", "--independent",
                                            f"{b.out}/eval/independent", *method_args, "--block", f"ablation-{b.name}",
                                            "--description", f"AdvBCT ablations, {b.name}{b.tag}",
                                            "--out", f"{b.out}/ablation.json", "--markdown", f"{b.out}/ablation.md",
                                            "--criterion"))]
    return steps


def block_steps(alloc, backbone, preset=None, old_epoch=None, data=None, kind="table", python=None):
    """The plan of a ``kind`` ("table" or "ablation") block, resolved by :func:`resolve_block`."""
    block = resolve_block(alloc, backbone, preset, old_epoch, data)
    return {"table": table_steps, "ablation": ablation_steps}[kind](block, python)
