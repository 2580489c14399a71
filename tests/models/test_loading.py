"""load_trained_model refuses a checkpoint holding NaN or inf weights in one line naming the config key, the
file and the first bad tensor: in evaluation (NEW_MODEL / OLD_MODEL.WEIGHTS) and in meta extraction."""

import importlib.util
import os

import pytest
import torch

from advbct.errors import UserError
from advbct.models import build_model, load_trained_model, save_checkpoint
from helpers import REPO


def _poisoned(random_checkpoint, tmp_path, seed=0, embed_dim=16, num_classes=0):
    """A copy of a random ResNet-18 checkpoint with an inf in a BatchNorm buffer and a NaN in the embedding;
    (path, number of floating-point tensors the model loads)."""
    state = torch.load(random_checkpoint(seed, embed_dim, num_classes), map_location="cpu", weights_only=True)
    state["model"]["backbone.layer2.0.bn1.running_var"][5] = float("inf")
    state["model"]["embedding.fc.weight"][0, 1] = float("nan")
    path = str(tmp_path / "diverged.pth")
    save_checkpoint(path, state)
    model = build_model("resnet18", embed_dim=embed_dim, num_classes=0, pretrained=False)
    return path, sum(1 for t in model.state_dict().values() if t.is_floating_point())


def _tool(name, argv, capsys):
    """tools/<name>.py's main in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(f"advbct_tool_{name}", REPO / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        tool.main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_nan_weights_are_refused_naming_key_file_and_tensor(random_checkpoint, tmp_path):
    path, n = _poisoned(random_checkpoint, tmp_path)
    with pytest.raises(UserError) as info:
        load_trained_model("resnet18", path, "OLD_MODEL.WEIGHTS")
    assert str(info.value) == (f"OLD_MODEL.WEIGHTS: {path} holds NaN or inf in 2 of {n} weight tensors "
                               f"(first: backbone.layer2.0.bn1.running_var); was it saved after its training "
                               f"diverged?")
    load_trained_model("resnet18", random_checkpoint(0, 16), "OLD_MODEL.WEIGHTS")  # the clean original loads


def test_huge_finite_weights_still_load(tmp_path):
    """A tensor whose sum overflows but whose values are finite is not taken for a NaN one."""
    model = build_model("resnet18", embed_dim=8, num_classes=0, pretrained=False)
    with torch.no_grad():
        model.backbone.conv1.weight.fill_(3e37)
    path = tmp_path / "huge.pth"
    save_checkpoint(path, {"model": model.state_dict()})
    loaded = load_trained_model("resnet18", str(path), "NEW_MODEL.WEIGHTS")
    assert torch.equal(loaded.backbone.conv1.weight, model.backbone.conv1.weight)


@pytest.mark.slow
def test_test_py_names_the_diverged_checkpoint(tiny_synthetic, random_checkpoint, tmp_path, capsys):
    path, n = _poisoned(random_checkpoint, tmp_path)
    save = tmp_path / "eval"
    code, out, err = _tool("test", ["NEW_MODEL.WEIGHTS", random_checkpoint(0, 16), "OLD_MODEL.WEIGHTS", path,
                                    "EVAL.ROOT", str(tiny_synthetic / "ROxfordParis"), "EVAL.IMG_SIZE", "32",
                                    "EVAL.NUM_WORKERS", "0", "EVAL.SAVE_DIR", str(save)], capsys)
    assert code == 2
    assert err.splitlines() == [f"error: OLD_MODEL.WEIGHTS: {path} holds NaN or inf in 2 of {n} weight tensors "
                                f"(first: backbone.layer2.0.bn1.running_var); was it saved after its training "
                                f"diverged?"]
    assert not save.exists()  # refused before anything was written


def test_extract_meta_names_the_diverged_old_checkpoint(image_list, random_checkpoint, tmp_path, capsys):
    path, n = _poisoned(random_checkpoint, tmp_path, seed=7, embed_dim=32, num_classes=4)
    meta = tmp_path / "meta" / "meta.pt"
    code, out, err = _tool("extract_meta", ["OLD_MODEL.WEIGHTS", path, "COMP_LOSS.META_PATH", str(meta),
                                            "META.TRAIN_LIST", str(image_list / "train.txt"),
                                            "DATA.ROOT", str(image_list), "DATA.IMG_SIZE", "32",
                                            "EVAL.NUM_WORKERS", "0"], capsys)
    assert code == 2
    assert err.splitlines() == [f"error: OLD_MODEL.WEIGHTS: {path} holds NaN or inf in 2 of {n} weight tensors "
                                f"(first: backbone.layer2.0.bn1.running_var); was it saved after its training "
                                f"diverged?"]
    assert not meta.exists() and not (tmp_path / "meta").exists()
    assert os.listdir(tmp_path) == ["diverged.pth"]
