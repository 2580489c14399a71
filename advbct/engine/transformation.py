"""Fit the old-to-new transformation of forward-compatible training (scripts/train_transformation.sh).

DATA.TRAIN_LIST is embedded, without augmentation, by the old model (OLD_MODEL.WEIGHTS) and the new one
(NEW_MODEL.WEIGHTS, default OUTPUT/final.pth); then either the orthogonal Procrustes map in closed form or
FCT's network h trained on the feature pairs with the paper's recipe (L2 loss, Adam, linear warmup then
cosine decay, BatchNorm frozen for the second half), and OUTPUT/transformation.pth is written.
"""

import math
import os

import torch
import torch.nn.functional as F

from advbct import distributed as dist
from advbct.data.decoding import image_input
from advbct.data.image_list import ImageListDataset, read_image_list
from advbct.data.workers import resolve_num_workers
from advbct.errors import UserError
from advbct.evaluation.features import extract_features
from advbct.models import load_trained_model
from advbct.models.transformation import (
    KINDS,
    FCTTransformation,
    ProcrustesMap,
    map_features,
    orthogonal_procrustes,
    save_transformation,
)

__all__ = ["OUTPUT_NAME", "check_settings", "fct_lr", "fit", "fit_fct", "fit_procrustes", "train_transformation"]

OUTPUT_NAME = "transformation.pth"


# ------------------------------------------------------------------------------------------- settings
def check_settings(t):
    """The TRANSFORM section ``t`` checked before anything is read; one line naming the bad key."""
    if t.TYPE not in KINDS:
        raise UserError(f"TRANSFORM.TYPE '{t.TYPE}': expected one of {', '.join(KINDS)}")
    if t.TYPE != "fct":
        return
    checks = (("EPOCHS", t.EPOCHS >= 1, ">= 1"), ("LR", t.LR > 0, "> 0"),
              ("WEIGHT_DECAY", t.WEIGHT_DECAY >= 0, ">= 0"),
              ("WARMUP_EPOCHS", 0 <= t.WARMUP_EPOCHS < t.EPOCHS, f"0 .. TRANSFORM.EPOCHS - 1 ({t.EPOCHS - 1})"),
              ("BATCH_SIZE", t.BATCH_SIZE >= 2, ">= 2 (BatchNorm needs two rows)"),
              ("WIDTH", t.WIDTH >= 1, ">= 1"), ("DEPTH", t.DEPTH >= 1, ">= 1"))
    for key, ok, expect in checks:
        if not ok:
            raise UserError(f"TRANSFORM.{key} {getattr(t, key)}: expected {expect}")


def output_path(cfg):
    if not cfg.OUTPUT:
        raise UserError("OUTPUT is empty: give the folder transformation.pth is written to")
    if os.path.exists(cfg.OUTPUT) and not os.path.isdir(cfg.OUTPUT):
        raise UserError(f"OUTPUT {cfg.OUTPUT} is a file, not a folder")
    return os.path.join(cfg.OUTPUT, OUTPUT_NAME)


def new_model_source(cfg):
    """(arch, checkpoint, config key) of the new model: NEW_MODEL.WEIGHTS built as NEW_MODEL.ARCH, or, when
    that is empty, the model this config trained (OUTPUT/final.pth, MODEL.ARCH)."""
    if cfg.NEW_MODEL.WEIGHTS:
        return cfg.NEW_MODEL.ARCH, cfg.NEW_MODEL.WEIGHTS, "NEW_MODEL.WEIGHTS"
    return cfg.MODEL.ARCH, os.path.join(cfg.OUTPUT, "final.pth"), "NEW_MODEL.WEIGHTS (empty: OUTPUT/final.pth)"


# -------------------------------------------------------------------------------------------- fitting
def fit_procrustes(old, new):
    """The orthogonal map of the L2-normalised rows: retrieval compares directions, and an orthogonal map
    keeps norms, so only the directions are aligned."""
    w = orthogonal_procrustes(F.normalize(old.double(), dim=1), F.normalize(new.double(), dim=1))
    return ProcrustesMap(old.shape[1], new.shape[1], w)


def fct_lr(epoch, epochs, warmup, lr):
    """The paper code's per-epoch rate: linear warmup lr (e + 1) / warmup for e < warmup, then the cosine
    0.5 (1 + cos(pi (e - warmup) / (epochs - warmup))) lr."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * lr


def fit_fct(old, new, *, epochs=80, lr=5e-4, weight_decay=2.0 ** -15, warmup_epochs=5, batch_size=1024,
            width=2048, depth=2, seed=0, log=None):
    """FCT's h trained on the rows ``old`` -> ``new`` (tensors on one device) with the paper's L2 loss
    (mean squared error, as torch's MSELoss), Adam and the :func:`fct_lr` schedule; BatchNorm runs in eval
    mode from half the epochs on, as the paper code's ``switch_mode_to_eval``. Mini-batches are slices of a
    seeded permutation of the rows; a trailing batch of one row is left out of its epoch (BatchNorm needs
    two). Returns (network in eval mode, mean loss of each epoch). Same inputs and seed: the same bits."""
    device, n = old.device, old.shape[0]
    if n < 2:
        raise UserError(f"FCT needs at least 2 embedded images to train on, got {n}")
    old, new = old.float(), new.float()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the initial weights; the caller's random state is left as it was
        net = FCTTransformation(old.shape[1], new.shape[1], width, depth).to(device)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = fct_lr(epoch, epochs, warmup_epochs, lr)
        net.train(epoch < epochs / 2)
        perm = torch.randperm(n, generator=order).to(device)
        total = torch.zeros((), device=device)
        used = 0
        for start in range(0, n, batch_size):
            rows = perm[start:start + batch_size]
            if len(rows) < 2 and net.training:
                continue
            loss = F.mse_loss(net(old[rows]), new[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
            used += len(rows)
        history.append(float(total) / used)  # one host sync per epoch
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: lr {optimizer.param_groups[0]['lr']:.3g} loss {history[-1]:.5f}")
        if not math.isfinite(history[-1]):
            raise UserError(f"FCT training diverged (loss {history[-1]} at epoch {epoch + 1}): lower TRANSFORM.LR")
    return net.eval(), history


def fit(kind, old, new, t, seed=0, log=None):
    """(transformation, summary) of TRANSFORM.TYPE ``kind`` fitted on the feature rows, with the section ``t``."""
    if kind == "procrustes":
        module, history = fit_procrustes(old, new), []
    else:
        module, history = fit_fct(old, new, epochs=t.EPOCHS, lr=t.LR, weight_decay=t.WEIGHT_DECAY,
                                  warmup_epochs=t.WARMUP_EPOCHS, batch_size=t.BATCH_SIZE, width=t.WIDTH,
                                  depth=t.DEPTH, seed=seed, log=log)
    return module, {"losses": history, **fit_errors(module, old, new)}


def fit_errors(module, old, new):
    """Mean squared distance to the new rows of the mapped old rows, and of the old rows themselves when
    the dims agree (the identity map), on the rows the kind is fitted to (L2-normalised for Procrustes)."""
    if isinstance(module, ProcrustesMap):
        old, new = F.normalize(old.float(), dim=1), F.normalize(new.float(), dim=1)
    mapped = torch.as_tensor(map_features(module, old)).to(new.device)
    out = {"mse_mapped": float(F.mse_loss(mapped, new.float()))}
    out["mse_identity"] = float(F.mse_loss(old.float(), new.float())) if old.shape == new.shape else None
    return out


# ------------------------------------------------------------------------------------- the whole step
def _embed(model, dataset, cfg, desc, progress):
    return extract_features(model, dataset, batch_size=cfg.EVAL.BATCH_SIZE,
                            num_workers=resolve_num_workers(cfg.EVAL.NUM_WORKERS, "EVAL.NUM_WORKERS"),
                            amp=cfg.EVAL.AMP, desc=desc, progress=progress)


def _check_finite(features, key, path):
    if not bool(torch.isfinite(features).all()):
        raise UserError(f"{key}: the model {path} embeds DATA.TRAIN_LIST to NaN or inf features")


def train_transformation(cfg, progress=True):
    """Embed DATA.TRAIN_LIST with both models, fit TRANSFORM.TYPE, write OUTPUT/transformation.pth.

    Every input is checked before the first image is embedded; rank 0 fits and writes. Returns the
    summary dict (path, kind, dims, images, losses, fit errors) on every rank."""
    t = cfg.TRANSFORM
    check_settings(t)
    path = output_path(cfg)
    if not cfg.OLD_MODEL.WEIGHTS:
        raise UserError("OLD_MODEL.WEIGHTS is empty: the transformation maps the old model's embeddings")
    if not cfg.DATA.TRAIN_LIST:
        raise UserError("DATA.TRAIN_LIST is empty: give the list whose images the transformation is fitted on")
    new_arch, new_path, new_key = new_model_source(cfg)
    _, _, device = dist.init_distributed()
    images = image_input(cfg.DATA.IMG_SIZE, cfg.DATA.DECODE, device)  # no augmentation
    paths, labels = read_image_list(cfg.DATA.TRAIN_LIST, root=cfg.DATA.ROOT)
    old_model = load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", device=device)
    new_model = load_trained_model(new_arch, new_path, new_key, device=device)
    dataset = ImageListDataset(paths, labels, image_input=images)
    old = _embed(old_model, dataset, cfg, "embed with the old model", progress)
    new = _embed(new_model, dataset, cfg, "embed with the new model", progress)
    del old_model, new_model

    def fit_and_write():  # rank 0: its error reaches every rank, nothing written
        _check_finite(old, "OLD_MODEL.WEIGHTS", cfg.OLD_MODEL.WEIGHTS)
        _check_finite(new, new_key, new_path)
        say = print if progress else None
        module, summary = fit(t.TYPE, old.to(device), new.to(device), t, seed=cfg.SEED, log=say)
        summary = {"path": path, "kind": t.TYPE, "in_dim": int(old.shape[1]), "out_dim": int(new.shape[1]),
                   "images": int(old.shape[0]), **summary}
        provenance = {"old_weights": cfg.OLD_MODEL.WEIGHTS, "old_arch": cfg.OLD_MODEL.ARCH,
                      "new_weights": new_path, "new_arch": new_arch, "train_list": cfg.DATA.TRAIN_LIST,
                      "seed": int(cfg.SEED), "settings": {k: t[k] for k in t}, **summary}
        save_transformation(path, module, provenance)
        return summary

    return dist.run_on_main(fit_and_write)

