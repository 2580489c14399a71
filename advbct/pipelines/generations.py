"""The plan of scripts/reproduce_generations.sh: a chain of model generations phi1 -> phi2 -> ... , each new model
trained compatible with its predecessor by a registered method, and the chain's compatibility matrix.

A chain is ``BACKBONE:SHARE`` per generation (default ``r18:0.3,r18:0.6,r50:1.0``): generation k trains a
BACKBONE on SHARE of the classes (allocation ``class``) or of every class's images (``data``), nested in the
next one's (tools/split_dataset.py --chain). phi1 is trained once, like a block's old model; then for each
method, generation k >= 2 is trained with the block config ``<alloc>_<backbone>/<method>.yml`` against
generation k-1 (its checkpoint, architecture and, for the methods that read it, its class meta over its own
train list); with ``--against all``, against every earlier generation (OLD_MODEL.EARLIER_WEIGHTS: one more
compatibility term per model). Each method's chain is tested by scripts/test_generations.sh on every test set
(``<out>/<method>/matrix/matrix.{json,md,png}``) and the methods' AC and AM are collected into
``<out>/generations.{md,json}`` (tools/collect_generations.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from advbct.errors import UserError
from advbct.pipelines.blocks import (ALLOCATIONS, BACKBONES, UsageError, _real_data_files, pretrain_step, set_roots,
                                     synthetic_overrides)
from advbct.pipelines.steps import Stamp, Step, SyntheticList

__all__ = ["DEFAULT_CHAIN", "DEFAULT_METHODS", "GENERATIONS_USAGE", "Chain", "generation_steps",
           "parse_chain", "parse_generations_args", "resolve_chain"]

GENERATIONS_USAGE = ("usage: bash scripts/reproduce_generations.sh {data,class} [--methods advbct,bct] "
                     "[--chain r18:0.3,r18:0.6,r50:1.0] [--against previous|all] [--synthetic PRESET]")
AGAINST = ("previous", "all")  # which earlier generations a new one is trained compatible with
DEFAULT_CHAIN = "r18:0.3,r18:0.6,r50:1.0"
DEFAULT_METHODS = "advbct,bct"


def parse_chain(text):
    """``r18:0.3,r18:0.6,r50:1.0`` -> ``[("r18", 0.3), ...]``, checked (one-line UserError naming --chain)."""
    from advbct.data.splits import check_chain_ratios

    chain = []
    for part in text.split(","):
        backbone, _, share = part.strip().partition(":")
        try:
            ratio = float(share)
        except ValueError:
            raise UserError(f"--chain {text}: expected BACKBONE:SHARE per generation, e.g. {DEFAULT_CHAIN}") from None
        if backbone not in BACKBONES:
            raise UserError(f"--chain {text}: backbone '{backbone}' (expected {' or '.join(BACKBONES)})")
        chain.append((backbone, ratio))
    check_chain_ratios([r for _, r in chain], f"--chain {text}")
    return chain


def _check_methods(text):
    """Registered methods, each named once, that train compatibility into the model itself (a method whose
    cross test maps the old gallery, FCT, has no chain of maps here)."""
    from advbct.losses.build import needs_transformation
    from advbct.losses.registry import get_method

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise UserError(f"--methods {text}: expected distinct method names, e.g. {DEFAULT_METHODS}")
    for m in methods:
        get_method(m)  # an unknown name: the one-line error listing the registered methods
        if needs_transformation({"TYPE": m}):
            raise UserError(f"--methods {m}: its cross test maps the old gallery (EVAL.OLD_TRANSFORM), which a "
                            f"chain of generations does not fit; choose methods that train compatibility in")
        if get_method(m).new_head is not None or get_method(m).teacher_key is not None:
            raise UserError(f"--methods {m}: its new model has another embedding size than its old one and learns "
                            f"from a phi* teacher, which a chain of generations does not fit; choose methods that "
                            f"keep the embedding size")
    return methods


def parse_generations_args(argv):
    """``ALLOC [--methods M1,M2] [--chain BB:SHARE,...] [--against previous|all] [--synthetic PRESET]`` ->
    (alloc, methods, chain, preset or None, against); a mistake is a one-line UserError (:class:`UsageError`:
    the usage line alone)."""
    argv = list(argv)
    if not argv:
        raise UsageError(GENERATIONS_USAGE)
    alloc, rest = argv[0], argv[1:]
    options = {"--methods": DEFAULT_METHODS, "--chain": DEFAULT_CHAIN, "--against": "previous", "--synthetic": None}
    while rest:
        arg = rest.pop(0)
        if arg not in options:
            raise UserError(f"unknown argument '{arg}'; {GENERATIONS_USAGE}")
        if not rest or not rest[0] or rest[0].startswith("--"):
            raise UserError(f"{arg} needs a value; {GENERATIONS_USAGE}")
        options[arg] = rest.pop(0)
    if alloc not in ALLOCATIONS:
        raise UserError(f"unknown allocation '{alloc}' (expected data or class)")
    preset = options["--synthetic"]
    if preset is not None:
        from advbct.data.synthetic import PRESETS

        if preset not in PRESETS:
            raise UserError(f"--synthetic {preset}: expected one of {', '.join(PRESETS)}")
    if options["--against"] not in AGAINST:
        raise UserError(f"--against {options['--against']}: expected {' or '.join(AGAINST)}")
    return alloc, _check_methods(options["--methods"]), parse_chain(options["--chain"]), preset, options["--against"]


@dataclass(frozen=True)
class Chain:
    """A chain's paths and settings, resolved (:func:`resolve_chain`)."""

    alloc: str
    methods: tuple
    generations: tuple    # ((backbone, share), ...), oldest first
    preset: str | None
    data: str
    configs: str          # configs/synthetic or configs/gldv2
    tag: str
    roots: tuple
    data_opts: tuple
    eval_opts: tuple
    pretrain_root: str | None
    full_list: object
    list_dir: str
    out: str
    against: str = "previous"  # "all": each generation trained compatible with every earlier one

    @property
    def logs(self):
        return f"{self.out}/logs"

    def config(self, k, name):
        """Generation k's (1-based) config ``name`` (old, independent or a method), of its backbone's block."""
        return f"{self.configs}/{self.alloc}_{self.generations[k - 1][0]}/{name}.yml"

    def train_list(self, k):
        from advbct.data.splits import chain_list_name

        return f"{self.list_dir}/{chain_list_name([r for _, r in self.generations[:k]], self.alloc)}"

    def init(self, k):
        """The backbone weights generation k starts from (the synthetic stand-in for ImageNet weights)."""
        if self.pretrain_root is None:
            return ()
        return ("MODEL.PRETRAINED_PATH", f"{self.pretrain_root}/{self.generations[k - 1][0]}/final.pth")

    def run_dir(self, method, k):
        """Where generation k of ``method``'s chain is trained; phi1 is shared by every method."""
        return f"{self.out}/gen1" if k == 1 else f"{self.out}/{method}/gen{k}"

    def arch(self, k):
        from advbct.config import load_config

        return str(load_config(self.config(k, "independent")).MODEL.ARCH)


def resolve_chain(alloc, methods, generations, preset=None, data=None, out=None, pretrain_root=None,
                  against="previous"):
    """The :class:`Chain` on the real datasets (``preset`` None; laid out as in Dataset.md) or on the
    synthetic benchmark ``preset`` in ``data`` (default ./data/synthetic-<preset>); its outputs under ``out``
    (default ./output/generations/<alloc>_<chain>[_synthetic-<preset>]); a synthetic chain's pretrained
    backbones in ``pretrain_root`` (default: the table blocks' ./output/reproduce/pretrain_synthetic-<preset>);
    ``against``: "previous" or "all" (then the default ``out`` ends in _against-all)."""
    shares = "_".join(f"{bb}-{round(100 * r)}" for bb, r in generations)
    if against == "all":
        shares += "_against-all"
    if preset:
        data = data or f"./data/synthetic-{preset}"
        tag, configs = f"_synthetic-{preset}", "configs/synthetic"
        data_opts = synthetic_overrides(data, alloc)
        eval_opts = ("EVAL.IMG_SIZE", "64", "EVAL.NUM_WORKERS", "1", "EVAL.BATCH_SIZE", "128")
        pretrain_root = pretrain_root or f"./output/reproduce/pretrain{tag}"  # shared with the table blocks
        full_list, list_dir, roots = SyntheticList(data), f"{data}/gldv2", set_roots(data)
    else:
        data, tag, configs = "./data/GLDv2", "", "configs/gldv2"
        data_opts = eval_opts = ()
        pretrain_root = None
        for need in _real_data_files(data, "./data/ROxfordParis", "./data/GLDv2"):
            if not os.path.exists(need):
                raise UserError(f"{need} not found: lay out the datasets as in Dataset.md (or use --synthetic PRESET)")
        full_list = f"{data}/label_81313.txt"
        list_dir, roots = os.path.dirname(full_list), set_roots()
    for k in range(1, len(generations) + 1):
        for m in methods if k > 1 else ():
            path = f"{configs}/{alloc}_{generations[k - 1][0]}/{m}.yml"
            if not os.path.isfile(path):
                raise UserError(f"--methods {m}: no config {path} for generation {k}")
    return Chain(alloc=alloc, methods=tuple(methods), generations=tuple(generations), preset=preset or None,
                 data=data, configs=configs, tag=tag, roots=roots, data_opts=data_opts, eval_opts=eval_opts,
                 pretrain_root=pretrain_root, full_list=full_list, list_dir=list_dir,
                 out=out or f"./output/generations/{alloc}_{shares}{tag}", against=against)  # e.g. class_r18-30_r18-60_r50-100


def _needs_meta(config):
    from advbct.config import load_config
    from advbct.losses.build import needs_meta

    return needs_meta(load_config(config).COMP_LOSS)


def generation_steps(chain, python=None, extra=()):
    """The plan: (synthetic benchmark, its check, stamps, pretrained backbones), the chain's train lists,
    phi1, then per method each later generation (with its predecessor's meta where the method reads one),
    its matrix, and the methods' summary. ``extra``: KEY VALUE overrides added to every training, meta
    extraction and test command (e.g. a shorter schedule)."""
    py = python or sys.executable
    c, extra, steps = chain, tuple(extra), []
    backbones = list(dict.fromkeys(bb for bb, _ in c.generations))
    if c.preset:
        source = f"{c.data}/SYNTHETIC.json"
        steps += [Step(f"synthetic benchmark ({c.preset})", source, (py, "tools/make_synthetic.py", "--out", c.data,
                                                                      "--preset", c.preset), f"{c.logs}/synthetic.log"),
                  c.full_list,
                  Stamp(source, (c.pretrain_root, c.out))]
        steps += [pretrain_step(bb, c.data, f"{c.pretrain_root}/{bb}", f"{c.logs}/pretrain_{bb}.log", *extra)
                  for bb in backbones]
    else:
        steps.append(Stamp(c.full_list, (c.out,)))
    t = len(c.generations)
    shares = ",".join(f"{r:g}" for _, r in c.generations)
    steps.append(Step(f"chain split by {c.alloc} ({shares})", c.train_list(t),
                      (py, "tools/split_dataset.py", "--list", c.full_list, "--by", c.alloc, "--chain", shares),
                      f"{c.logs}/split.log"))
    old_cfg = c.config(1, "old") if os.path.isfile(c.config(1, "old")) else c.config(1, "independent")
    steps.append(Step(f"gen1 ({c.generations[0][0]}, {shares.split(',')[0]} of the {c.alloc})",
                      f"{c.run_dir(None, 1)}/final.pth",
                      ("bash", "scripts/train_old.sh", old_cfg, *c.data_opts, *c.init(1), *extra,
                       "DATA.TRAIN_LIST", c.train_list(1), "OUTPUT", c.run_dir(None, 1)), f"{c.logs}/gen1.log"))
    metas = {}
    for method in c.methods:
        weights = [f"{c.run_dir(method, 1)}/final.pth"]
        for k in range(2, t + 1):
            config, prev = c.config(k, method), c.run_dir(method, k - 1)
            compat = ["OLD_MODEL.WEIGHTS", f"{prev}/final.pth", "OLD_MODEL.ARCH", c.arch(k - 1)]
            reads_meta = _needs_meta(config)  # the config read once per generation
            if reads_meta:
                meta = f"{prev}/meta.pt"
                compat += ["COMP_LOSS.META_PATH", meta]
                if meta not in metas:  # phi1's meta: one for every method
                    metas[meta] = Step(f"gen{k - 1} class meta ({method if k > 2 else 'shared'})", meta,
                                       ("bash", "scripts/extract_meta.sh", config, *c.data_opts, *extra, *compat,
                                        "META.TRAIN_LIST", c.train_list(k - 1)),
                                       f"{c.logs}/{method if k > 2 else 'gen1'}_meta{k - 1}.log")
                    steps.append(metas[meta])
            earlier = range(1, k - 1) if c.against == "all" else ()  # gen1 .. gen(k-2), beside gen(k-1)
            if earlier:
                compat += ["OLD_MODEL.EARLIER_WEIGHTS", f"[{','.join(f'{c.run_dir(method, j)}/final.pth' for j in earlier)}]",
                           "OLD_MODEL.EARLIER_ARCHS", f"[{','.join(c.arch(j) for j in earlier)}]"]
                if reads_meta:  # each earlier generation's meta, made when its successor trained
                    compat += ["OLD_MODEL.EARLIER_META_PATHS",
                               f"[{','.join(f'{c.run_dir(method, j)}/meta.pt' for j in earlier)}]"]
            against = f"gen1-gen{k - 1}" if earlier else f"gen{k - 1}"
            steps.append(Step(f"{method} gen{k} ({c.generations[k - 1][0]}, against {against})",
                              f"{c.run_dir(method, k)}/final.pth",
                              ("bash", "scripts/train_new.sh", config, *c.data_opts, *c.init(k), *compat, *extra,
                               "DATA.TRAIN_LIST", c.train_list(k), "OUTPUT", c.run_dir(method, k)),
                              f"{c.logs}/{method}_gen{k}.log"))
            weights.append(f"{c.run_dir(method, k)}/final.pth")
        names = [f"gen{k}" for k in range(1, t + 1)]
        steps.append(Step(f"{method} compatibility matrix", f"{c.out}/{method}/matrix/matrix.json",
                          ("bash", "scripts/test_generations.sh", "landmark", ",".join(s for s, _ in c.roots),
                           ",".join(r for _, r in c.roots), *c.eval_opts, *extra,
                           "GENERATIONS.WEIGHTS", f"[{','.join(weights)}]",
                           "GENERATIONS.ARCHS", f"[{','.join(c.arch(k) for k in range(1, t + 1))}]",
                           "GENERATIONS.NAMES", f"[{','.join(names)}]",
                           "EVAL.SAVE_DIR", f"{c.out}/{method}/matrix"), f"{c.logs}/{method}_matrix.log"))
    from advbct.losses.registry import labels

    method_args = [a for m in c.methods for a in ("--method", f"{labels()[m]}={c.out}/{m}/matrix")]
    steps.append(Step("generations table", None,
                      (py, "tools/collect_generations.py", *method_args, "--description",
                       f"{c.alloc} allocation, chain {' -> '.join(f'{bb} {r:g}' for bb, r in c.generations)}"
                       f"{', each against every earlier generation' if c.against == 'all' else ''}{c.tag}",
                       "--out", f"{c.out}/generations.json", "--markdown", f"{c.out}/generations.md")))
    return steps
