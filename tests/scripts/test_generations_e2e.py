"""A chain of three generations on the tiny synthetic benchmark, through the plan of
scripts/reproduce_generations.sh (every step one of the bash entry points or tools, one process each):
the chain's lists, gen1, the metas, AdvBCT gen2 against gen1 and gen3 against gen2, the matrix on every test
set and the summary. Tiny on purpose (32 px, 32-d, 2 iterations per epoch): the assertions are about what each
generation trained against and about the matrix's entries, not about accuracy."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from advbct.data.decoding import ImageInput
from advbct.evaluation.features import extract_features
from advbct.evaluation.protocol import image_datasets, load_test_set, score
from advbct.meta import load_meta
from advbct.models import load_trained_model
from advbct.pipelines.generations import generation_steps, parse_chain, resolve_chain
from advbct.pipelines.steps import run_steps
from helpers import REPO

pytestmark = pytest.mark.slow

SHRINK = ("DATA.IMG_SIZE", "32", "EVAL.IMG_SIZE", "32", "MODEL.EMB_DIM", "32", "TRAIN.EPOCHS", "1",
          "TRAIN.MAX_ITERS_PER_EPOCH", "2", "TRAIN.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0", "EVAL.NUM_WORKERS", "0")


def _writable_copy(tiny, data):
    """DATA with its own gldv2/ folder (the chain's lists are written there), everything else linked."""
    data.mkdir()
    for entry in Path(tiny).iterdir():
        if entry.name == "gldv2":
            (data / "gldv2").mkdir()
            for item in entry.iterdir():
                (data / "gldv2" / item.name).symlink_to(item)
        elif entry.is_file():
            shutil.copy(entry, data / entry.name)
        else:
            (data / entry.name).symlink_to(entry)


def test_a_chain_of_three_adv_bct_generations(tiny_synthetic, random_checkpoint, tmp_path, monkeypatch, capsys):
    data, out, pretrain = tmp_path / "data", tmp_path / "out", tmp_path / "pretrain"
    _writable_copy(tiny_synthetic, data)
    (pretrain / "r18").mkdir(parents=True)  # the stand-in for ImageNet weights: a random R18, step [done]
    shutil.copy(random_checkpoint(5, 32), pretrain / "r18" / "final.pth")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("NGPUS", "1")
    chain = resolve_chain("class", ["advbct"], parse_chain("r18:0.3,r18:0.6,r18:1.0"), "tiny", str(data),
                          out=str(out), pretrain_root=str(pretrain))
    run_steps(generation_steps(chain, extra=SHRINK))
    console = capsys.readouterr().out
    assert f"[done] pretrain backbone (r18, {data}/pretrain)" in console

    # what each generation trained on and against (classes: 12, 24, 40 of tiny's 40)
    lists = [data / "gldv2" / f"gldv2_train_chain_{s}_class.txt" for s in ("30", "30-60", "30-60-100")]
    runs = [out / "gen1", out / "advbct" / "gen2", out / "advbct" / "gen3"]
    for k, (run, train_list, classes) in enumerate(zip(runs, lists, (12, 24, 40))):
        state = torch.load(run / "final.pth", map_location="cpu", weights_only=True)
        assert state["num_classes"] == classes and state["config"]["DATA"]["TRAIN_LIST"] == str(train_list)
        if k:
            assert state["config"]["OLD_MODEL"]["WEIGHTS"] == str(runs[k - 1] / "final.pth")
            assert state["config"]["COMP_LOSS"]["META_PATH"] == str(runs[k - 1] / "meta.pt")
            assert load_meta(str(runs[k - 1] / "meta.pt")).num_classes == (12, 24)[k - 1]

    # the matrix: AC and AM recomputed from its entries; one off-diagonal entry recomputed from the checkpoints
    result = json.loads((out / "advbct" / "matrix" / "matrix.json").read_text())
    assert [g["weights"] for g in result["generations"]] == [str(r / "final.pth") for r in runs]
    assert list(result["sets"]) == ["rparis6k", "roxford5k", "gldv2"]
    for entry in result["sets"].values():
        c = entry["matrix"]
        pairs = [(i, j) for i in range(3) for j in range(i)]
        assert entry["AC"] == pytest.approx(sum(c[i][j] > c[j][j] for i, j in pairs) / 3)
        assert entry["AM"] == pytest.approx(np.mean([c[i][j] for i in range(3) for j in range(i + 1)]))
    test_set = load_test_set("rparis6k", str(data / "ROxfordParis"))
    images = ImageInput(32, "pil")
    q_ds, g_ds = image_datasets(test_set, images)
    gen3 = load_trained_model("resnet18", str(runs[2] / "final.pth"), "gen3")
    gen1 = load_trained_model("resnet18", str(runs[0] / "final.pth"), "gen1")
    q3 = extract_features(gen3, q_ds, batch_size=64, num_workers=0, progress=False).numpy()
    g1 = extract_features(gen1, g_ds, batch_size=64, num_workers=0, progress=False).numpy()
    assert result["sets"]["rparis6k"]["matrix"][2][0] == test_set.kind.headline(score(test_set, q3, g1))
    summary = json.loads((out / "generations.json").read_text())
    assert summary["methods"]["AdvBCT"]["gldv2"]["AC"] == result["sets"]["gldv2"]["AC"]
    assert os.path.getsize(out / "advbct" / "matrix" / "matrix.png") > 0
