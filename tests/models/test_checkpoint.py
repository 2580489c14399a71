"""Checkpoints: atomic save, safe load, DDP / original AdvBCT release formats, refusal of pickled code."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision

from advbct.errors import UserError
from advbct.models import (
    build_model,
    checkpoint_embed_dim,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from helpers import REPO as REPO_PATH

REPO = str(REPO_PATH)


def _tiny_model(num_classes=3, embed_dim=8, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet18", embed_dim=embed_dim, num_classes=num_classes)


def _assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------- saving
def test_round_trip_is_exact(tmp_path):
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32))["logits"].sum().backward()
    opt.step()
    config = {"MODEL": {"ARCH": "resnet18", "EMB_DIM": 8}, "LR": 0.1, "MILESTONES": [5, 10, 20], "AMP": False}
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config, "epoch": 4}
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 4 and loaded["config"] == config
    _assert_same_state(loaded["model"], model.state_dict())
    momentum = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth"]  # no temp file left behind


def test_failing_save_leaves_existing_file_intact(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.arange(3.0)}})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"payload\['config'\]\['fn'\] has type .*function"):
        save_checkpoint(path, {"epoch": 2, "config": {"fn": lambda x: x}})
    with pytest.raises(TypeError, match=r"payload\['best'\] has type numpy"):
        save_checkpoint(path, {"best": np.float64(0.5)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_crash_during_write_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def crashing_save(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}


# -------------------------------------------------------------------------------------------- loading
def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*absent.pth"):
        load_checkpoint(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(UserError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(junk)
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"model": _tiny_model().state_dict()})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(cut)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(UserError, match="tensor.pth: expected a checkpoint dict"):
        load_checkpoint(tensor_only)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Evil(marker)}, zipped)
    raw = tmp_path / "evil_raw.pkl"
    with open(raw, "wb") as handle:
        pickle.dump({"x": _Evil(marker)}, handle, protocol=2)
    for path in (zipped, raw):
        with pytest.raises(UserError, match=r"refusing to load: it references the Python object (posix|nt|os)\.system"):
            load_checkpoint(path)
        with pytest.raises(UserError, match="refusing"):
            load_model_weights(_tiny_model(), path)
    assert not marker.exists()
    # sanity: an unrestricted load really would run it, so the check above can fail
    torch.load(zipped, weights_only=False)
    assert marker.exists()


def test_ddp_prefix_is_stripped(tmp_path):
    source = _tiny_model(seed=1)
    ddp_state = OrderedDict(("module." + k, v) for k, v in source.state_dict().items())
    path = tmp_path / "ddp.pth"
    save_checkpoint(path, {"model": ddp_state, "epoch": 7, "config": {"a": 1}})
    target = _tiny_model(seed=2)
    info = load_model_weights(target, path)
    _assert_same_state(target.state_dict(), source.state_dict())
    assert info["ddp_prefix"] is True and info["format"] == "advbct"
    assert info["epoch"] == 7 and info["config"] == {"a": 1}
    assert info["embed_dim"] == 8 and info["num_classes"] == 3
    assert info["missing"] == [] and info["unexpected"] == [] and info["dropped"] == []
    wrapped = torch.nn.DataParallel(_tiny_model(seed=5))  # a wrapper is looked through
    load_model_weights(wrapped, path)
    _assert_same_state(wrapped.module.state_dict(), source.state_dict())


def test_bare_state_dict_and_classifier_dropped_for_eval_model(tmp_path):
    source = _tiny_model(seed=3)
    path = tmp_path / "bare.pth"
    save_checkpoint(path, source.state_dict())
    evaluator = _tiny_model(num_classes=0, seed=4)
    info = load_model_weights(evaluator, path)
    assert info["format"] == "state_dict" and info["dropped"] == ["classifier.weight"]
    assert info["num_classes"] == 3 and info["config"] is None
    want = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    _assert_same_state(evaluator.state_dict(), want)
    assert checkpoint_embed_dim(path) == 8


def test_mismatches_are_user_errors_naming_checkpoint_and_keys(tmp_path):
    path = tmp_path / "ck.pth"
    state = _tiny_model().state_dict()
    save_checkpoint(path, {"model": state})
    with pytest.raises(UserError, match=r"ck.pth: weights do not fit the model: embedding.fc.weight has shape \(8, 512\)"):
        load_model_weights(_tiny_model(embed_dim=16), path)
    partial = dict(state)
    del partial["embedding.bn.running_var"]
    partial["extra.weight"] = torch.zeros(1)
    save_checkpoint(path, {"model": partial})
    with pytest.raises(UserError, match=r"missing \['embedding.bn.running_var'\], unexpected \['extra.weight'\]"):
        load_model_weights(_tiny_model(), path)
    info = load_model_weights(_tiny_model(), path, strict=False)
    assert info["missing"] == ["embedding.bn.running_var"] and info["unexpected"] == ["extra.weight"]
    save_checkpoint(path, {"epoch": 1, "config": {}})
    with pytest.raises(UserError, match="no model weights found"):
        load_model_weights(_tiny_model(), path)
    with pytest.raises(UserError, match="no model weights found"):
        checkpoint_embed_dim(path)


# ----------------------------------------------------------------------- original AdvBCT release format
def _fake_yacs(monkeypatch):
    """A stand-in ``yacs.config`` module whose CfgNode pickles as yacs' does (dict subclass + __dict__)."""
    package = types.ModuleType("yacs")
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = False

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    module.CfgNode = CfgNode
    package.config = module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def _original_checkpoint(tmp_path, monkeypatch):
    """Write a checkpoint laid out like the original release; return (path, expected our-name weights)."""
    CfgNode = _fake_yacs(monkeypatch)
    torch.manual_seed(11)
    convnet = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    convnet["bn1.running_mean"] = torch.randn(64)
    model = OrderedDict(("convnet." + k, v) for k, v in convnet.items())
    model["projection_dim.weight"] = torch.randn(16, 512)
    model["bn.weight"] = torch.rand(16)
    model["bn.bias"] = torch.randn(16)
    model["bn.running_mean"] = torch.randn(16)
    model["bn.running_var"] = torch.rand(16) + 0.5
    model["bn.num_batches_tracked"] = torch.tensor(1234)
    model["projection_cls.weight"] = torch.randn(7, 16)
    model["discriminator.d_fc1.weight"] = torch.randn(100, 16)
    model["discriminator.d_bn1.weight"] = torch.rand(100)
    model["eboundary.weight"] = torch.rand(7)
    config = CfgNode({
        "MODEL": CfgNode({"ARCH": "resnet18", "EMB_DIM": 16, "PRETRAINED": True}),
        "TRAIN": CfgNode({"EPOCHS": 30, "LR": 0.1, "MILESTONES": [5, 10, 20], "THRESHOLD": 1.0}),
        "OUTPUT": "output/old",
    })
    checkpoint = {
        "epoch": 30,
        "arch": "CreateBaseModel",
        "model": model,
        "best_acc1": np.float64(0.4213),
        "extra_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
        "grad_scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "config": config,
    }
    path = tmp_path / "checkpoint_epoch30.pth.tar"
    torch.save(checkpoint, path)
    expected = OrderedDict(("backbone." + k, v) for k, v in convnet.items())
    expected["embedding.fc.weight"] = model["projection_dim.weight"]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        expected["embedding.bn." + name] = model["bn." + name]
    expected["classifier.weight"] = model["projection_cls.weight"]
    return path, expected


_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["yacs"] = None  # make sure no yacs can be imported
    import torch
    from advbct.models import build_model, checkpoint_embed_dim, load_checkpoint, load_model_weights

    src, out = sys.argv[1], sys.argv[2]

    def all_plain(obj):
        if isinstance(obj, dict):
            return type(obj) is dict and all(all_plain(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return all(all_plain(v) for v in obj)
        return type(obj) in (str, int, float, bool, type(None))

    model = build_model("resnet18", embed_dim=16, num_classes=7)
    info = load_model_weights(model, src)
    torch.save(model.state_dict(), out)
    evaluator = build_model("resnet18", embed_dim=16, num_classes=0)
    info_eval = load_model_weights(evaluator, src)
    ckpt = load_checkpoint(src)
    print(json.dumps({
        "info": {k: v for k, v in info.items()},
        "eval_dropped": info_eval["dropped"],
        "eval_equal": all(torch.equal(v, model.state_dict()[k]) for k, v in evaluator.state_dict().items()),
        "config_plain": all_plain(ckpt["config"]),
        "best_acc1": ckpt["best_acc1"], "best_type": type(ckpt["best_acc1"]).__name__,
        "extra": ckpt["extra_scalars"], "extra_types": [type(v).__name__ for v in ckpt["extra_scalars"]],
        "embed_dim": checkpoint_embed_dim(src),
        "yacs_loaded": sys.modules.get("yacs") is not None,
    }))
    """
)


@pytest.mark.slow
def test_original_release_checkpoint_loads_without_yacs(tmp_path, monkeypatch):
    path, expected = _original_checkpoint(tmp_path, monkeypatch)
    out = tmp_path / "loaded.pt"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(path), str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key

    info = result["info"]
    assert info["format"] == "original" and info["embed_dim"] == 16 and info["num_classes"] == 7
    assert info["epoch"] == 30 and info["missing"] == [] and info["unexpected"] == []
    assert sorted(info["dropped"]) == ["discriminator.d_bn1.weight", "discriminator.d_fc1.weight", "eboundary.weight"]
    assert info["config"] == {
        "MODEL": {"ARCH": "resnet18", "EMB_DIM": 16, "PRETRAINED": True},
        "TRAIN": {"EPOCHS": 30, "LR": 0.1, "MILESTONES": [5, 10, 20], "THRESHOLD": 1.0},
        "OUTPUT": "output/old",
    }
    assert result["config_plain"] is True and result["yacs_loaded"] is False
    assert "classifier.weight" in result["eval_dropped"] and result["eval_equal"] is True
    assert result["best_acc1"] == 0.4213 and result["best_type"] == "float"
    assert result["extra"] == [1.5, -3, True] and result["extra_types"] == ["float", "int", "bool"]
    assert result["embed_dim"] == 16


def test_original_config_cannot_smuggle_code(tmp_path, monkeypatch):
    CfgNode = _fake_yacs(monkeypatch)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_cfg.pth"
    torch.save({"model": {"projection_dim.weight": torch.ones(2, 2)}, "config": CfgNode({"X": _Evil(marker)})}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_trained_model_reads_the_checkpoint_once(tmp_path, monkeypatch):
    import advbct.models.checkpoint as checkpoint_module
    import advbct.models.loading as loading_module
    from advbct.models import load_trained_model

    model = _tiny_model(num_classes=3, embed_dim=8)
    path = tmp_path / "m.pth"
    save_checkpoint(path, {"model": model.state_dict()})
    reads = []

    def counting_load(p, *args, **kwargs):
        reads.append(os.fspath(p))
        return load_checkpoint(p, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", counting_load)
    monkeypatch.setattr(loading_module, "load_checkpoint", counting_load)
    rebuilt = load_trained_model("resnet18", str(path), "NEW_MODEL.WEIGHTS", with_classifier=True)
    assert reads == [str(path)]
    assert (rebuilt.spec["embed_dim"], rebuilt.spec["num_classes"]) == (8, 3)
    _assert_same_state(rebuilt.state_dict(), model.state_dict())
