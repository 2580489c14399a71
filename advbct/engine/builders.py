"""The one place where config keys become library calls: models, datasets, the compatibility loss."""

import os


from advbct.data.image_list import ImageListDataset, read_image_list
from advbct.data.transforms import train_transform
from advbct.errors import UserError
from advbct.losses import build_compat_loss, needs_meta
from advbct.meta import load_meta
from advbct.models import build_model, load_checkpoint, load_model_weights


def checkpoint_shapes(path, key):
    """``(embed_dim, num_classes)`` stored in a checkpoint (ours or the original release's format).

    ``key`` is the config key that named the file, for the error message.
    """
    if not path:
        raise UserError(f"{key} is empty: give the checkpoint path")
    if not os.path.isfile(path):
        raise UserError(f"{key}: checkpoint not found: {path}")
    state = load_checkpoint(path)
    weights = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(weights, dict):
        raise UserError(f"{key}: {path} holds no state dict")
    weights = {k[7:] if k.startswith("module.") else k: v for k, v in weights.items()}
    emb = weights.get("embedding.fc.weight", weights.get("projection_dim.weight"))
    cls = weights.get("classifier.weight", weights.get("projection_cls.weight"))
    if emb is None:
        raise UserError(f"{key}: {path} has no embedding layer (embedding.fc.weight / projection_dim.weight)")
    return int(emb.shape[0]), (int(cls.shape[0]) if cls is not None else 0)


def load_trained_model(arch, path, key, *, with_classifier=False, device="cpu"):
    """Build ``arch`` with the embedding size (and classifier) found in checkpoint ``path`` and load it."""
    embed_dim, num_classes = checkpoint_shapes(path, key)
    model = build_model(arch, embed_dim=embed_dim,
                        num_classes=num_classes if with_classifier else 0, pretrained=False)
    load_model_weights(model, path)
    return model.to(device)


def check_same_embedding(new_path, old_path):
    """Cross-test needs one embedding space: refuse models of different sizes before any extraction."""
    new_dim, _ = checkpoint_shapes(new_path, "NEW_MODEL.WEIGHTS")
    old_dim, _ = checkpoint_shapes(old_path, "OLD_MODEL.WEIGHTS")
    if new_dim != old_dim:
        raise UserError(f"new model {new_path} embeds to {new_dim} dims but old model {old_path} to "
                        f"{old_dim}: cross-test needs the same embedding size (MODEL.EMB_DIM)")
    return new_dim


def build_train_dataset(cfg, num_classes=None):
    """DATA.TRAIN_LIST (paths relative to DATA.ROOT) as a dataset of resized, normalised images."""
    if not cfg.DATA.TRAIN_LIST:
        raise UserError("DATA.TRAIN_LIST is empty: give the training list file ('relative/path label' lines)")
    paths, labels = read_image_list(cfg.DATA.TRAIN_LIST, root=cfg.DATA.ROOT, num_classes=num_classes)
    transform = train_transform(cfg.DATA.IMG_SIZE, cfg.DATA.AUGMENT, cfg.DATA.CROP_SCALE)
    return ImageListDataset(paths, labels, transform=transform), labels


def build_new_model(cfg, num_classes):
    model = build_model(cfg.MODEL.ARCH, embed_dim=cfg.MODEL.EMB_DIM, num_classes=num_classes,
                        classifier=cfg.LOSS.TYPE, pretrained=cfg.MODEL.PRETRAINED,
                        weights_path=cfg.MODEL.PRETRAINED_PATH or None,
                        scale=cfg.LOSS.SCALE, margin=cfg.LOSS.MARGIN,
                        zero_init_residual=cfg.MODEL.ZERO_INIT_RESIDUAL)
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS)
    return model


def build_compatibility(cfg, num_classes, device):
    """Frozen old model and compatibility loss for ``COMP_LOSS.TYPE`` (``(None, None)`` when empty).

    Everything a method needs is checked here, before the first training step.
    """
    kind = cfg.COMP_LOSS.TYPE
    if not kind:
        return None, None
    if not cfg.OLD_MODEL.WEIGHTS:
        raise UserError(f"COMP_LOSS.TYPE {kind} needs the old model: set OLD_MODEL.WEIGHTS")
    old_dim, old_classes = checkpoint_shapes(cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS")
    if old_dim != cfg.MODEL.EMB_DIM:
        raise UserError(f"OLD_MODEL.WEIGHTS embeds to {old_dim} dims but MODEL.EMB_DIM is "
                        f"{cfg.MODEL.EMB_DIM}: compatible training needs the same embedding size")
    num_old = cfg.OLD_MODEL.NUM_CLASSES or old_classes
    if num_old <= 0:
        raise UserError("OLD_MODEL.NUM_CLASSES is 0 and the old checkpoint has no classifier: set it")
    if num_old > num_classes:
        raise UserError(f"the old model has {num_old} classes but the new training list only "
                        f"{num_classes}: old classes must keep their ids 0..{num_old - 1}")
    old_model = load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS",
                                   with_classifier=True, device=device)
    old_model.eval().requires_grad_(False)
    meta = None
    meta_path = cfg.COMP_LOSS.META_PATH
    if needs_meta(cfg.COMP_LOSS):
        if not meta_path:
            raise UserError(f"COMP_LOSS.TYPE {kind} needs the old-class meta: set COMP_LOSS.META_PATH "
                            f"(made by scripts/extract_meta.sh)")
        meta = load_meta(meta_path, device=device)
        if meta.num_classes != num_old:
            raise UserError(f"COMP_LOSS.META_PATH {meta_path} holds {meta.num_classes} classes but the "
                            f"old model has {num_old}")
    old_weight = old_model.classifier.weight.detach() if old_model.classifier is not None else None
    loss = build_compat_loss(cfg.COMP_LOSS, embed_dim=cfg.MODEL.EMB_DIM, num_old_classes=num_old,
                             total_epochs=cfg.TRAIN.EPOCHS, meta=meta,
                             old_classifier_weight=old_weight)
    return old_model, loss.to(device)

