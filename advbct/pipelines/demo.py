"""The plan of scripts/demo.sh: the main job on a synthetic benchmark, start to finish.

1 the synthetic benchmark, 2 the pretrained ResNet-18 backbone both models start from (the stand-in for
ImageNet weights), 3 the class split (30 % old), 4 the old ResNet-18, 5 its class meta, 6 phi* and 7 an
AdvBCT new model, 8 both tested against the old model on every test set, 9 the table with P_up / P_comp /
P_1 and whether the compatibility criterion holds. Results in OUT (table.json in the schema of
paper_table.json).
"""

from __future__ import annotations

import sys

from advbct.pipelines.blocks import _table_methods, pretrain_step, set_roots, synthetic_overrides
from advbct.pipelines.steps import EvalStep, Stamp, Step, SyntheticList

__all__ = ["DEMO_CONFIGS", "demo_steps"]

DEMO_CONFIGS = "configs/synthetic/class_r18"


def demo_steps(preset="small", data=None, out="./output/demo", python=None):
    """The demo's plan on the synthetic benchmark ``preset`` in ``data`` (default ./data/synthetic-<preset>),
    its outputs under ``out``."""
    py = python or sys.executable
    data = data or f"./data/synthetic-{preset}"
    cfg, logs = DEMO_CONFIGS, f"{out}/logs"
    old, meta = f"{out}/old/final.pth", f"{out}/old/meta.pt"
    syn = synthetic_overrides(data, "class")
    compat = ("OLD_MODEL.WEIGHTS", old, "COMP_LOSS.META_PATH", meta)
    init = ("MODEL.PRETRAINED_PATH", f"{out}/pretrain/final.pth")
    roots = set_roots(data)
    steps = [
        Step(f"1/9 synthetic benchmark ({preset})", f"{data}/SYNTHETIC.json",
             (py, "tools/make_synthetic.py", "--out", data, "--preset", preset), f"{logs}/synthetic.log"),
        SyntheticList(data),  # a benchmark of another format version stops the demo here
        Stamp(f"{data}/SYNTHETIC.json", (out,)),
        pretrain_step("r18", data, f"{out}/pretrain", f"{logs}/pretrain.log", prefix="2/9 "),
        Step("3/9 class split (30 % old)", f"{data}/gldv2/gldv2_train_new_100percent_class.txt",
             (py, "tools/split_dataset.py", "--list", SyntheticList(data), "--by", "class", "--ratio", "0.3"),
             f"{logs}/split.log"),
        Step("4/9 train old model (R18, 30 % of classes)", old,
             ("bash", "scripts/train_old.sh", f"{cfg}/old.yml", *syn, *init,
              "DATA.TRAIN_LIST", f"{data}/gldv2/gldv2_train_old_30percent_class.txt", "OUTPUT", f"{out}/old"),
             f"{logs}/old.log"),
        Step("5/9 old-class meta", meta, ("bash", "scripts/extract_meta.sh", f"{cfg}/advbct.yml", *syn, *compat),
             f"{logs}/meta.log"),
        Step("6/9 train phi* (no compatibility)", f"{out}/independent/final.pth",
             ("bash", "scripts/train_new.sh", f"{cfg}/independent.yml", *syn, *init, "OUTPUT", f"{out}/independent"),
             f"{logs}/independent.log"),
        Step("7/9 train AdvBCT new model", f"{out}/advbct/final.pth",
             ("bash", "scripts/train_new.sh", f"{cfg}/advbct.yml", *syn, *init, *compat, "OUTPUT", f"{out}/advbct"),
             f"{logs}/advbct.log"),
    ]
    for model in ("independent", "advbct"):
        steps.append(EvalStep(f"8/9 test {model}", f"{out}/{model}/final.pth", "resnet18", old, f"{out}/eval/{model}",
                              f"{logs}/test_{model}.log", tuple(s for s, _ in roots), tuple(r for _, r in roots),
                              ("EVAL.IMG_SIZE", "64", "EVAL.NUM_WORKERS", "1", "EVAL.BATCH_SIZE", "128",
                               "EVAL.BACKFILL", "true", "EVAL.OLD_FEATURES_CACHE", f"{out}/eval/old_features")))
    label = dict(_table_methods())["advbct"]
    steps.append(Step("9/9 table", None,
                      (py, "tools/collect_results.py", "--independent", f"{out}/eval/independent",
                       "--method", f"{label}={out}/eval/advbct", "--block", "class", "--description",
                       f"synthetic ({preset}) extended-class: old R18 on 30 % of the classes, new R18",
                       "--out", f"{out}/table.json", "--markdown", f"{out}/table.md", "--criterion")))
    return steps
