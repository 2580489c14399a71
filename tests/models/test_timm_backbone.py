"""timm backbones (``MODEL.ARCH timm:<name>``): architecture, weights from files and from timm's cache,
errors, checkpoints, synchronised BatchNorm of timm's BatchNormAct2d (the scripts end to end with a timm
backbone: tests/scripts/test_pipeline_e2e.py)."""

import copy
import re
import sys

import pytest
import torch
import torchvision
from torch import nn

from advbct.engine.sync_bn import AllReduceBatchNorm, AllReduceBatchNormAct, convert_sync_batchnorm
from advbct.errors import UserError
from advbct.models import build_backbone, build_model, load_model_weights, load_trained_model, save_checkpoint

import timm  # noqa: E402  (the test environment installs the timm extra: scripts/lib/venv.sh)
from timm.layers import BatchNormAct2d, SyncBatchNormAct  # noqa: E402



def _eval_features(module, x):
    with torch.no_grad():
        return module.eval()(x)


def _assert_one_line(exc_info):
    assert "\n" not in str(exc_info.value)


# ------------------------------------------------------------------------------------- architecture
def test_timm_resnet18_is_torchvision_resnet18():
    """The release's timm ResNets are torchvision's: same names, and with the same weights same features."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BN statistics, so a mismatched buffer would show
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    torch.manual_seed(1)
    backbone, out_dim = build_backbone("timm:resnet18", pretrained=False)
    assert out_dim == 512
    backbone.load_state_dict(state, strict=True)
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    got, want = _eval_features(backbone, x), _eval_features(tv, x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_timm_resnet50_checkpoint_evaluates_as_torchvision_resnet50(tmp_path):
    """A model trained as timm:resnet50.a1_in1k (the GLDv2 configs) loads into a torchvision-built resnet50
    (scripts/test.sh with NEW_MODEL_ARCH=resnet50) and embeds identically."""
    torch.manual_seed(0)
    model = build_model("timm:resnet50.a1_in1k", embed_dim=16, num_classes=5, pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "final.pth"
    save_checkpoint(str(path), {"model": model.state_dict()})
    x = torch.randn(2, 3, 64, 64)
    as_timm = load_trained_model("timm:resnet50.a1_in1k", str(path), "NEW_MODEL.WEIGHTS")
    as_tv = load_trained_model("resnet50", str(path), "NEW_MODEL.WEIGHTS")
    assert type(as_tv.backbone).__module__.startswith("torchvision")
    want = model.eval().embed(x).detach()
    torch.testing.assert_close(as_timm.eval().embed(x).detach(), want, rtol=0, atol=0)
    torch.testing.assert_close(as_tv.eval().embed(x).detach(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("arch, dim", [("timm:resnet18", 512), ("timm:convnext_atto", 320),
                                       ("TIMM:ResNet18.tv_in1k", 512)])
def test_out_dim_and_recorded_arch(arch, dim):
    torch.manual_seed(0)
    model = build_model(arch, embed_dim=8, num_classes=3, pretrained=False)
    assert model.spec["backbone_dim"] == dim and model.embedding.fc.in_features == dim
    assert model.spec["arch"] == "timm:" + arch.split(":", 1)[1].lower()
    out = model(torch.randn(2, 3, 32, 32))
    assert out["feat"].shape == (2, 8) and out["logits"].shape == (2, 3)


def test_out_dim_is_the_pre_logits_width():
    """MobileNetV3 pools 288 channels, then a 1024-wide head layer: what the headless model returns."""
    backbone, out_dim = build_backbone("timm:mobilenetv3_small_050")
    assert backbone.num_features == 288 and out_dim == 1024
    assert _eval_features(backbone, torch.randn(1, 3, 32, 32)).shape == (1, 1024)


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def convnext_ckpt(tmp_path_factory):
    """A trained-looking advbct checkpoint of timm:convnext_atto (16-d embedding, 5 classes)."""
    torch.manual_seed(3)
    model = build_model("timm:convnext_atto", embed_dim=16, num_classes=5, pretrained=False)
    with torch.no_grad():
        model.embedding.bn.running_mean.uniform_(-0.5, 0.5)
    path = tmp_path_factory.mktemp("timm_ckpt") / "final.pth"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 1, "num_classes": 5})
    return path, model


def test_checkpoint_round_trip(convnext_ckpt):
    path, model = convnext_ckpt
    x = torch.randn(3, 3, 32, 32)
    want = _eval_features(model, x)["feat"]
    rebuilt = load_trained_model("timm:convnext_atto", str(path), "NEW_MODEL.WEIGHTS", with_classifier=True)
    torch.testing.assert_close(_eval_features(rebuilt, x)["feat"], want, rtol=0, atol=0)
    assert rebuilt.num_classes == 5 and rebuilt.embed_dim == 16
    torch.manual_seed(99)
    fresh = build_model("timm:convnext_atto", embed_dim=16, pretrained=False)  # no classifier
    assert not torch.equal(_eval_features(fresh, x)["feat"], want)
    info = load_model_weights(fresh, path)
    assert info["format"] == "advbct" and info["dropped"] == ["classifier.weight"]
    torch.testing.assert_close(_eval_features(fresh, x)["feat"], want, rtol=0, atol=0)


def test_advbct_checkpoint_as_pretrained_path(convnext_ckpt):
    """MODEL.PRETRAINED_PATH = an advbct checkpoint: its backbone, strictly; another arch is refused."""
    path, model = convnext_ckpt
    backbone, _ = build_backbone("timm:convnext_atto", weights_path=str(path))
    want = model.backbone.state_dict()
    got = backbone.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(UserError, match=re.escape(f"{path}: its backbone does not match 'timm:resnet18'")) as exc:
        build_backbone("timm:resnet18", weights_path=str(path))
    _assert_one_line(exc)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_file_with_classifier(tmp_path, suffix):
    """A timm state dict with its 1000-way classifier (head.fc): the backbone gets the file's tensors."""
    torch.manual_seed(5)
    source = timm.create_model("convnext_atto", pretrained=False)  # with classifier
    state = source.state_dict()
    assert "head.fc.weight" in state
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    torch.manual_seed(6)
    backbone, out_dim = build_backbone("timm:convnext_atto", weights_path=str(path))
    got = backbone.state_dict()
    assert out_dim == 320 and "head.fc.weight" not in got
    assert set(got) == set(state) - {"head.fc.weight", "head.fc.bias"}
    assert all(torch.equal(got[k], state[k]) for k in got)
    assert "state_dict" not in backbone.pretrained_cfg  # no second copy of the weights kept around


def test_torchvision_file_into_timm_resnet(tmp_path):
    """torchvision's resnet18 file (fc included) loads into timm:resnet18 through MODEL.PRETRAINED_PATH."""
    torch.manual_seed(7)
    tv = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    backbone, _ = build_backbone("timm:resnet18", weights_path=str(path))
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_eval_features(backbone, x), _eval_features(tv, x), rtol=0, atol=1e-5)


def test_mismatched_file_is_one_line_naming_it(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer1.0.conv1.weight"]  # timm would leave it at random init if it loaded non-strictly
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=re.escape(f"{path}: weights do not match timm 'resnet18'")) as exc:
        build_backbone("timm:resnet18", weights_path=str(path))
    assert "layer1.0.conv1.weight" in str(exc.value)
    _assert_one_line(exc)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=re.escape(f"{junk}: not a readable weights file")):
        build_backbone("timm:resnet18", weights_path=str(junk))
    with pytest.raises(UserError, match="pretrained weights file not found"):
        build_backbone("timm:resnet18", weights_path=str(tmp_path / "absent.pth"))


# ---------------------------------------------------------------------------------------------- errors
def test_without_timm_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails
    with pytest.raises(UserError, match=r"backbone 'timm:resnet50' \(MODEL.ARCH\) needs timm: pip install "
                                        r"'timm>=1.0'") as exc:
        build_model("timm:resnet50", pretrained=False)
    _assert_one_line(exc)
    # torchvision backbones never import timm, and synchronising their BatchNorm does not either
    model = build_model("resnet18", embed_dim=8, pretrained=False)
    bns = [m for m in convert_sync_batchnorm(model, torch.device("cpu")).modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is AllReduceBatchNorm for m in bns)


@pytest.mark.parametrize("arch, hint", [("timm:resnet5", "did you mean 'timm:resnet50'?"),
                                        ("timm:convnext_atom", "did you mean 'timm:convnext_atto'?"),
                                        ("timm:resnet18.tv_in1", "did you mean 'timm:resnet18.tv_in1k'?"),
                                        ("timm:", "give a timm model name after 'timm:'")])
def test_unknown_name_names_closest(arch, hint):
    with pytest.raises(UserError, match=re.escape(hint)) as exc:
        build_backbone(arch)
    assert f"'{arch}'" in str(exc.value)
    _assert_one_line(exc)


def test_pretrained_offline_without_cache(monkeypatch, tmp_path):
    """timm's own weights, offline with an empty Hugging Face cache: one line saying how to fix it."""
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # read at import time by huggingface_hub: set here too, so nothing is looked up online
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as exc:
        build_backbone("timm:resnet18.tv_in1k", pretrained=True)
    text = str(exc.value)
    assert text.startswith("backbone 'timm:resnet18.tv_in1k': timm could not load its pretrained weights")
    assert "HF_HUB_OFFLINE" in text and "MODEL.PRETRAINED_PATH" in text
    assert "timm.create_model('resnet18.tv_in1k', pretrained=True)" in text
    _assert_one_line(exc)


def test_zero_init_residual_refused():
    with pytest.raises(UserError, match=r"MODEL.ZERO_INIT_RESIDUAL applies to torchvision resnets only, "
                                        r"not 'timm:resnet18'"):
        build_backbone("timm:resnet18", zero_init_residual=True)
    # what it would ask for is timm's default: every block's last BN starts at gamma 0
    backbone, _ = build_backbone("timm:resnet18")
    assert all(float(b.bn2.weight.detach().abs().max()) == 0.0 for layer in (backbone.layer1, backbone.layer4)
               for b in layer)


# ------------------------------------------------------------------------------------ synchronised BN
def _norm_act_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].bias.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("device, types", [("cpu", (AllReduceBatchNormAct, AllReduceBatchNorm)),
                                           ("cuda", (SyncBatchNormAct, nn.SyncBatchNorm))])
def test_sync_bn_keeps_the_activation_of_batchnormact(device, types):
    """BatchNormAct2d -> a synchronised BN that still applies its ReLU (a plain conversion drops it).
    The CUDA conversion only swaps modules, so it is checked here too (eval mode: no rank is needed)."""
    net = _norm_act_net()
    x = torch.randn(2, 3, 8, 8)
    want = _eval_features(net, x)
    pre_act = _eval_features(nn.Sequential(net[0], nn.BatchNorm2d(4).eval()), x)
    converted = convert_sync_batchnorm(copy.deepcopy(net), torch.device(device))
    assert type(converted[1]) is types[0] and type(converted[3]) is types[1]
    assert isinstance(converted[1].act, nn.ReLU)
    assert converted.state_dict().keys() == net.state_dict().keys()
    torch.testing.assert_close(_eval_features(converted, x), want, rtol=0, atol=0)
    # the activation matters here: without it the output differs
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert not torch.allclose(_eval_features(plain, x), want)
    assert (pre_act < 0).any()


def test_sync_bn_on_a_timm_model_training_step():
    """A timm model full of BatchNormAct2d: converted on CPU, one process trains as before the conversion."""
    torch.manual_seed(0)
    model = build_model("timm:test_efficientnet", embed_dim=8, num_classes=3, pretrained=False)
    n_norm_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert n_norm_act > 5
    reference = copy.deepcopy(model).train()
    converted = convert_sync_batchnorm(model, torch.device("cpu")).train()
    assert sum(isinstance(m, AllReduceBatchNormAct) for m in converted.modules()) == n_norm_act
    assert not any(isinstance(m, BatchNormAct2d) for m in converted.modules())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(converted(x)["feat"], reference(x)["feat"], rtol=1e-5, atol=1e-5)
    after, before = converted.state_dict(), reference.state_dict()  # running statistics moved alike
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[k].float(), before[k].float(), atol=1e-6) for k in before)
