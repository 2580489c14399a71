"""docs/extending.md runs: each code block (a method, a backbone, a test set) is executed as written and
then used through the library the way the page says."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_image_list

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import test_sets
from advbct.evaluation.protocol import load_test_set, score
from advbct.losses import build_compat_loss
from advbct.losses.registry import list_methods, unregister_method
from advbct.models import build_model, save_checkpoint, unregister_backbone

PAGE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def code_blocks():
    """The page's python blocks by the file their first line names."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    return {block.splitlines()[0].lstrip("# ").split()[0]: block for block in blocks}


def run_block(path):
    namespace = {"__name__": f"extending_docs_{Path(path).stem}"}
    exec(compile(code_blocks()[path], f"{PAGE}:{path}", "exec"), namespace)
    return namespace


def test_the_page_has_the_three_examples():
    assert set(code_blocks()) == {"advbct/losses/cosine.py", "advbct/models/tiny_cnn.py",
                                  "advbct/evaluation/test_sets.py"}


@pytest.fixture
def cosine_method():
    ns = run_block("advbct/losses/cosine.py")
    yield ns
    unregister_method("cosine")


def test_method_example_is_a_configurable_loss(cosine_method):
    assert "cosine" in list_methods() and "cosine" not in list_methods(paper_rows=True)
    cfg = load_config(None, ["COMP_LOSS.TYPE", "cosine", "COMP_LOSS.COS_SCALE", "2"])
    assert cfg.COMP_LOSS.COS_SCALE == 2.0
    loss = build_compat_loss(cfg.COMP_LOSS, embed_dim=4, num_old_classes=2, total_epochs=1)
    g = torch.Generator().manual_seed(0)
    fn, fo = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 3])  # rows 0, 1, 3 are of old classes
    out = loss(fn, fo, labels, progress=0.0, epoch=0)
    expected = 2.0 * (1 - F.cosine_similarity(fn, fo))[[0, 1, 3]].mean()
    torch.testing.assert_close(out["cosine"], expected)
    with pytest.raises(UserError, match=r"COMP_LOSS.COS_SCALE -1.0: expected > 0"):
        build_compat_loss({"TYPE": "cosine", "COS_SCALE": -1.0}, embed_dim=4, num_old_classes=2, total_epochs=1)


def test_backbone_example_builds_trains_and_loads(tmp_path):
    run_block("advbct/models/tiny_cnn.py")
    try:
        torch.manual_seed(0)
        model = build_model("tiny_cnn", embed_dim=8, num_classes=3)
        out = model(torch.randn(2, 3, 32, 32))
        assert model.spec["backbone_dim"] == 32 and out["feat"].shape == (2, 8) and out["logits"].shape == (2, 3)
        path = tmp_path / "model.pth"
        save_checkpoint(str(path), {"model": model.state_dict()})
        started = build_model("tiny_cnn", embed_dim=8, weights_path=str(path))  # a new model from it
        for key, value in model.backbone.state_dict().items():
            assert torch.equal(started.backbone.state_dict()[key], value), key
        with pytest.raises(UserError, match="has no ImageNet weights"):
            build_model("tiny_cnn", pretrained=True)
    finally:
        unregister_backbone("tiny_cnn")


def test_test_set_example_loads_and_scores(tmp_path):
    root = tmp_path / "lists"
    write_image_list(root, classes=3, per_class=4, size=8)
    lines = (root / "train.txt").read_text().splitlines()
    (root / "query_list.txt").write_text("".join(f"{ln}\n" for ln in lines[::4]))   # one query per class
    (root / "gallery_list.txt").write_text("".join(f"{ln}\n" for i, ln in enumerate(lines) if i % 4))
    run_block("advbct/evaluation/test_sets.py")
    try:
        assert test_sets.names()[-1] == "labelled_lists" and test_sets.label("labelled_lists") == "Lists"
        ts = load_test_set("labelled_lists", str(root))
        assert [g.tolist() for g in ts.ground_truth] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        # queries on their class's gallery images: every relevant image first, mAP@100 = 100; a query
        # set swapped between classes 0 and 1 retrieves the wrong class first for two of three queries
        gallery = np.repeat(np.eye(3, dtype=np.float32), 3, axis=0)
        assert score(ts, np.eye(3, dtype=np.float32), gallery) == {"mAP@100": 100.0}
        swapped = np.eye(3, dtype=np.float32)[[1, 0, 2]]
        assert score(ts, swapped, gallery)["mAP@100"] < 100.0
    finally:
        test_sets.unregister("labelled_lists")
