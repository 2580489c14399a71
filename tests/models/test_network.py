"""Backbones, heads and the retrieval model: shapes, hand-computed head formulas, pretrained weights."""

import math
import os

import pytest
import torch
import torchvision
from torch import nn

from advbct.errors import UserError
from advbct.models import (
    ArcFaceClassifier,
    CosFaceClassifier,
    EmbeddingHead,
    LinearClassifier,
    RetrievalModel,
    available_archs,
    build_backbone,
    build_classifier,
    build_model,
    default_weights_file,
)

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 file name
RESNET18_URL = "https://download.pytorch.org/models/" + RESNET18_FILE


def _gap_features(tv_model, x):
    """Reference ResNet pooled features written out layer by layer."""
    m = tv_model
    y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    y = m.layer4(m.layer3(m.layer2(m.layer1(y))))
    return y.mean(dim=(2, 3))


# ------------------------------------------------------------------------------------------ backbones
def test_resnet18_backbone_is_gap_features_of_torchvision_resnet():
    torch.manual_seed(0)
    backbone, out_dim = build_backbone("resnet18")
    assert out_dim == 512
    assert isinstance(backbone.fc, nn.Identity)
    backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = backbone(x)
        want = _gap_features(backbone, x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resnet50_model_forward_one_tiny_batch():
    torch.manual_seed(0)
    model = build_model("resnet50", embed_dim=256, num_classes=10)
    assert model.spec["backbone_dim"] == 2048
    assert model.embedding.fc.in_features == 2048
    out = model(torch.randn(2, 3, 32, 32))
    assert out["feat"].shape == (2, 256)
    assert out["logits"].shape == (2, 10)
    # softmax classifier on the un-normalised embedding, no bias
    torch.testing.assert_close(out["logits"], out["feat"] @ model.classifier.weight.t())


def test_generic_classifier_removal_mobilenet_v3_small():
    backbone, out_dim = build_backbone("mobilenet_v3_small")
    # classifier = Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000): last Linear removed
    assert out_dim == 1024
    assert isinstance(backbone.classifier[-1], nn.Identity)
    assert isinstance(backbone.classifier[0], nn.Linear)
    backbone.eval()
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 1024)


def test_unknown_arch_suggests_closest_and_lists_valid():
    with pytest.raises(UserError) as err:
        build_backbone("resnet5")
    msg = str(err.value)
    assert "did you mean 'resnet50'" in msg
    assert "resnet18" in msg and "\n" not in msg
    with pytest.raises(UserError, match="auxiliary"):
        build_backbone("inception_v3")
    assert "resnet18" in available_archs() and "googlenet" not in available_archs()


def test_pretrained_absent_names_file_location_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", RESNET18_FILE)
    assert default_weights_file("resnet18") == (expected, RESNET18_URL)
    with pytest.raises(UserError) as err:
        build_backbone("resnet18", pretrained=True)
    assert expected in str(err.value) and RESNET18_URL in str(err.value)
    with pytest.raises(UserError, match=r"not found: .*nowhere.pth \(MODEL.PRETRAINED_PATH\)"):
        build_backbone("resnet18", weights_path=str(tmp_path / "nowhere.pth"))


def test_pretrained_from_file_and_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = torchvision.models.resnet18()
    with torch.no_grad():
        source.bn1.running_mean.uniform_(-1, 1)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    weights = hub / RESNET18_FILE
    torch.save(source.state_dict(), weights)

    backbone, _ = build_backbone("resnet18", weights_path=str(weights))
    assert torch.equal(backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(backbone.bn1.running_mean, source.bn1.running_mean)
    assert torch.equal(backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model("resnet18", embed_dim=8, pretrained=True)
    assert torch.equal(model.backbone.layer3[0].downsample[0].weight, source.layer3[0].downsample[0].weight)
    # a random init differs, so the comparison above can fail
    assert not torch.equal(build_backbone("resnet18")[0].conv1.weight, source.conv1.weight)


def test_zero_init_residual_zeroes_each_branch_last_bn_and_loaded_weights_win(tmp_path):
    """MODEL.ZERO_INIT_RESIDUAL: every residual branch's last BN starts at gamma 0, so each block is the
    identity (resnet50: bn3, resnet18: bn2); other BNs keep gamma 1; a weights file overrides it."""
    r50, _ = build_backbone("resnet50", zero_init_residual=True)
    blocks = [b for layer in (r50.layer1, r50.layer2, r50.layer3, r50.layer4) for b in layer]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in blocks)
    default, _ = build_backbone("resnet50")
    assert all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in default.layer1)
    # a zeroed branch adds nothing: the block's output is relu(x + shortcut(x)) with its own input
    block = r50.layer1[1].eval()
    x = torch.randn(2, 256, 8, 8)
    assert torch.equal(block(x), torch.relu(x))
    r18, _ = build_backbone("resnet18", zero_init_residual=True)
    assert torch.count_nonzero(r18.layer2[0].bn2.weight) == 0
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded, _ = build_backbone("resnet18", weights_path=str(tmp_path / "w.pth"), zero_init_residual=True)
    assert torch.equal(loaded.layer2[0].bn2.weight, source.layer2[0].bn2.weight)
    # the config key reaches the model the trainer builds
    from advbct.config import load_config
    from advbct.engine.builders import build_new_model
    cfg = load_config(None, ["MODEL.PRETRAINED", "false", "MODEL.ZERO_INIT_RESIDUAL", "true", "MODEL.EMB_DIM", "8"])
    assert torch.count_nonzero(build_new_model(cfg, num_classes=3).backbone.layer4[1].bn2.weight) == 0
    cfg = load_config(None, ["MODEL.PRETRAINED", "false", "MODEL.EMB_DIM", "8"])
    assert torch.count_nonzero(build_new_model(cfg, num_classes=3).backbone.layer4[1].bn2.weight) == 512
    with pytest.raises(UserError, match="MODEL.ZERO_INIT_RESIDUAL applies to resnet backbones only, not 'vgg11'"):
        build_backbone("vgg11", zero_init_residual=True)


def test_pretrained_file_of_wrong_architecture_is_user_error(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError, match="r34.pth: weights do not match torchvision 'resnet18'"):
        build_backbone("resnet18", weights_path=str(path))


def test_pretrained_from_advbct_checkpoint_or_classifier_free_file(tmp_path):
    """MODEL.PRETRAINED_PATH may be a trained advbct checkpoint (its backbone is taken; head and classifier
    are not) or a torchvision file without the classifier; a missing backbone tensor is still an error."""
    from advbct.models import save_checkpoint

    torch.manual_seed(5)
    source = build_model("resnet18", embed_dim=8, num_classes=3)
    with torch.no_grad():
        source.backbone.bn1.running_var.uniform_(0.5, 2)
    ckpt = tmp_path / "final.pth"
    save_checkpoint(str(ckpt), {"model": source.state_dict(), "epoch": 1, "num_classes": 3})
    torch.manual_seed(6)
    model = build_model("resnet18", embed_dim=8, num_classes=5, weights_path=str(ckpt))
    own, src = model.backbone.state_dict(), source.backbone.state_dict()
    assert own.keys() == src.keys() and all(torch.equal(own[k], src[k]) for k in own)
    assert not torch.equal(model.embedding.fc.weight, source.embedding.fc.weight)  # head: fresh init

    bare = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(bare, tmp_path / "no_fc.pth")
    backbone, dim = build_backbone("resnet18", weights_path=str(tmp_path / "no_fc.pth"))
    assert dim == 512 and torch.equal(backbone.layer1[0].conv1.weight, bare["layer1.0.conv1.weight"])
    del bare["layer4.1.bn2.weight"]
    torch.save(bare, tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"short.pth: weights do not match .*missing \['layer4.1.bn2.weight'\]"):
        build_backbone("resnet18", weights_path=str(tmp_path / "short.pth"))


# ---------------------------------------------------------------------------------------------- heads
def test_embedding_head_is_bias_free_linear_then_batchnorm():
    torch.manual_seed(1)
    head = EmbeddingHead(6, 4)
    assert isinstance(head.fc, nn.Linear) and head.fc.bias is None
    assert isinstance(head.bn, nn.BatchNorm1d) and head.bn.num_features == 4
    assert [name for name, _ in head.named_children()] == ["fc", "bn"]
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        head.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        head.bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        head.bn.bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.2]))
    head.eval()
    x = torch.randn(3, 6)
    z = x @ head.fc.weight.t()
    want = (z - head.bn.running_mean) / torch.sqrt(head.bn.running_var + head.bn.eps) * head.bn.weight + head.bn.bias
    torch.testing.assert_close(head(x), want)


def test_softmax_classifier_is_plain_matmul_ignoring_labels():
    torch.manual_seed(2)
    clf = build_classifier("softmax", 5, 3)
    assert isinstance(clf, LinearClassifier) and clf.weight.shape == (3, 5)
    f = torch.randn(4, 5) * 3
    torch.testing.assert_close(clf(f), f @ clf.weight.t())
    torch.testing.assert_close(clf(f, torch.tensor([0, 1, 2, 0])), f @ clf.weight.t())


def _reference_margin_logits(feat, weight, labels, s, m, kind):
    """Per-element reference: s*cos, with the target replaced by cos(theta+m) or cos-m."""
    out = torch.zeros(feat.shape[0], weight.shape[0], dtype=torch.float64)
    for i in range(feat.shape[0]):
        f = feat[i].double() / feat[i].double().norm()
        for j in range(weight.shape[0]):
            w = weight[j].double() / weight[j].double().norm()
            c = float(f @ w)
            if labels is not None and int(labels[i]) == j:
                c = math.cos(math.acos(c) + m) if kind == "arcface" else c - m
            out[i, j] = s * c
    return out.float()


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_heads_match_reference(kind):
    torch.manual_seed(4)
    clf = build_classifier(kind, 8, 6, scale=16.0, margin=0.4)
    assert isinstance(clf, ArcFaceClassifier if kind == "arcface" else CosFaceClassifier)
    feat = torch.randn(5, 8)
    labels = torch.tensor([0, 5, 2, -1, 2])
    w = clf.weight.detach()
    torch.testing.assert_close(clf(feat), _reference_margin_logits(feat, w, None, 16.0, 0.4, kind), rtol=1e-5, atol=1e-5)
    got = clf(feat, labels)
    torch.testing.assert_close(got, _reference_margin_logits(feat, w, labels, 16.0, 0.4, kind), rtol=1e-5, atol=1e-5)
    # label -1 gets no margin; non-target entries equal the eval logits
    torch.testing.assert_close(got[3], clf(feat)[3])


def test_margin_heads_hand_computed_angles():
    # feature at 60 degrees from class 0 and 30 degrees from class 1
    feat = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]]) * 7.0
    arc = ArcFaceClassifier(2, 2, scale=2.0, margin=math.pi / 6)
    cos = CosFaceClassifier(2, 2, scale=2.0, margin=0.25)
    with torch.no_grad():
        arc.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
        cos.weight.copy_(arc.weight)
    s3 = math.sqrt(3) / 2
    # ArcFace target 0: cos(60 + 30 degrees) = 0
    torch.testing.assert_close(arc(feat, torch.tensor([0])), torch.tensor([[0.0, 2 * s3]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(arc(feat), torch.tensor([[1.0, 2 * s3]]))
    torch.testing.assert_close(cos(feat, torch.tensor([1])), torch.tensor([[1.0, 2 * (s3 - 0.25)]]))


def test_arcface_gradient_finite_when_feature_hits_class_direction():
    clf = ArcFaceClassifier(3, 2, scale=30.0, margin=0.3)
    feat = clf.weight.detach()[:1].clone().requires_grad_(True)  # cos = 1 exactly
    clf(feat, torch.tensor([0])).sum().backward()
    assert torch.isfinite(feat.grad).all() and torch.isfinite(clf.weight.grad).all()


def test_unknown_classifier_and_bad_class_count():
    with pytest.raises(UserError, match="unknown classifier 'arcfce'.*arcface"):
        build_classifier("arcfce", 4, 3)
    with pytest.raises(UserError, match="num_classes > 0"):
        build_classifier("softmax", 4, 0)


# ---------------------------------------------------------------------------------------------- model
def test_model_without_classifier_returns_no_logits():
    torch.manual_seed(5)
    model = build_model("resnet18", embed_dim=16, num_classes=0)
    assert model.classifier is None and model.num_classes == 0 and model.embed_dim == 16
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        want = model.embedding.bn(model.embedding.fc(_gap_features(model.backbone, x)))
    assert set(out) == {"feat", "branch"} and out["branch"] is out["feat"]  # the plain head has one branch
    torch.testing.assert_close(out["feat"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.embed(x), out["feat"])
    assert not any(k.startswith("classifier") for k in model.state_dict())


def test_model_forward_passes_labels_to_margin_head_and_uses_every_parameter():
    torch.manual_seed(6)
    model = build_model("resnet18", embed_dim=8, num_classes=4, classifier="cosface", scale=10.0, margin=0.2)
    assert isinstance(model, RetrievalModel) and model.num_classes == 4
    assert isinstance(model.embedding.fc, nn.Linear) and model.classifier.weight.shape == (4, 8)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    out = model(x, y)
    plain = model.classifier(out["feat"])
    delta = plain - out["logits"]
    expected = torch.zeros(3, 4)
    expected[torch.arange(3), y] = 10.0 * 0.2  # s * m on the target only
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=0)
    (out["feat"].sum() + out["logits"].sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []
