"""The one place where config keys become library calls: models, datasets, the compatibility loss."""

from advbct.data.decoding import image_input
from advbct.data.image_list import ImageListDataset, read_image_list
from advbct.errors import UserError
from advbct.losses import build_compat_loss, needs_meta
from advbct.losses.build import meta_classes, needs_transformation, new_model_head, teacher_checkpoint
from advbct.meta import load_meta
from advbct.models import build_model, checkpoint_shapes, load_model_weights, load_trained_model, read_checkpoint


def build_train_dataset(cfg, device, num_classes=None):
    """DATA.TRAIN_LIST (paths relative to DATA.ROOT) as a dataset of resized images decoded the DATA.DECODE
    way (``dataset.to_device`` normalises a batch on ``device``)."""
    if not cfg.DATA.TRAIN_LIST:
        raise UserError("DATA.TRAIN_LIST is empty: give the training list file ('relative/path label' lines)")
    d = cfg.DATA
    images = image_input(d.IMG_SIZE, d.DECODE, device, d.AUGMENT, d.CROP_SCALE)  # bad settings fail before reading
    paths, labels = read_image_list(d.TRAIN_LIST, root=d.ROOT, num_classes=num_classes)
    return ImageListDataset(paths, labels, image_input=images), labels


def build_new_model(cfg, num_classes):
    """The model being trained; its embedding head is the configured method's (BT²'s) or the plain one."""
    model = build_model(cfg.MODEL.ARCH, embed_dim=cfg.MODEL.EMB_DIM, num_classes=num_classes,
                        classifier=cfg.LOSS.TYPE, pretrained=cfg.MODEL.PRETRAINED,
                        weights_path=cfg.MODEL.PRETRAINED_PATH or None,
                        scale=cfg.LOSS.SCALE, margin=cfg.LOSS.MARGIN,
                        zero_init_residual=cfg.MODEL.ZERO_INIT_RESIDUAL,
                        head=new_model_head(cfg.COMP_LOSS, old_dim=cfg.MODEL.EMB_DIM))
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS)
    return model


def build_compatibility(cfg, num_classes, device):
    """Frozen old model and compatibility loss for ``COMP_LOSS.TYPE`` (``(None, None)`` when empty).

    Everything a method needs is checked here, before the first training step.
    """
    kind = cfg.COMP_LOSS.TYPE
    if not kind or needs_transformation(cfg.COMP_LOSS):  # FCT: the new model trains alone, as phi*
        return None, None
    if not cfg.OLD_MODEL.WEIGHTS:
        raise UserError(f"COMP_LOSS.TYPE {kind} needs the old model: set OLD_MODEL.WEIGHTS")
    return _against(cfg, num_classes, device, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", cfg.OLD_MODEL.ARCH,
                    cfg.OLD_MODEL.NUM_CLASSES, cfg.COMP_LOSS.META_PATH, "COMP_LOSS.META_PATH")


def build_earlier_compatibility(cfg, num_classes, device):
    """``[(old model, loss), ...]`` for OLD_MODEL.EARLIER_WEIGHTS, oldest first: the models before the old one
    that the new model is also trained compatible with, each by COMP_LOSS.TYPE with its own meta
    (OLD_MODEL.EARLIER_META_PATHS) and classes (read from its checkpoint). Checked here, in one line each."""
    o = cfg.OLD_MODEL
    weights = list(o.EARLIER_WEIGHTS)
    if not weights:
        return []
    kind = cfg.COMP_LOSS.TYPE
    if not kind or needs_transformation(cfg.COMP_LOSS):
        raise UserError(f"OLD_MODEL.EARLIER_WEIGHTS is set but COMP_LOSS.TYPE {kind or repr('')} trains no "
                        "compatibility term against an old model")
    archs = list(o.EARLIER_ARCHS) or [o.ARCH]
    if len(archs) not in (1, len(weights)):
        raise UserError(f"OLD_MODEL.EARLIER_ARCHS: {len(archs)} backbones for {len(weights)} checkpoints "
                        "(OLD_MODEL.EARLIER_WEIGHTS); expected one for all or one per checkpoint")
    metas = list(o.EARLIER_META_PATHS)
    if needs_meta(cfg.COMP_LOSS) and len(metas) != len(weights):
        raise UserError(f"OLD_MODEL.EARLIER_META_PATHS: {len(metas)} meta files for {len(weights)} checkpoints "
                        f"(OLD_MODEL.EARLIER_WEIGHTS); COMP_LOSS.TYPE {kind} reads one per model")
    return [_against(cfg, num_classes, device, w, f"OLD_MODEL.EARLIER_WEIGHTS[{j}]", archs[j % len(archs)], 0,
                     metas[j] if j < len(metas) else "", f"OLD_MODEL.EARLIER_META_PATHS[{j}]")
            for j, w in enumerate(weights)]


def _against(cfg, num_classes, device, weights, key, arch, num_old, meta_path, meta_key):
    """The frozen model of checkpoint ``weights`` (config ``key``) and the COMP_LOSS term against it."""
    kind = cfg.COMP_LOSS.TYPE
    ckpt = read_checkpoint(weights, key)  # read once: its shapes, then its weights
    old_dim, old_classes = checkpoint_shapes(weights, key, checkpoint=ckpt)
    if old_dim != cfg.MODEL.EMB_DIM:
        raise UserError(f"{key} embeds to {old_dim} dims but MODEL.EMB_DIM is "
                        f"{cfg.MODEL.EMB_DIM}: compatible training needs the same embedding size")
    num_old = num_old or old_classes
    main = key == "OLD_MODEL.WEIGHTS"
    if num_old <= 0:
        raise UserError("OLD_MODEL.NUM_CLASSES is 0 and the old checkpoint has no classifier: set it" if main else
                        f"{key} {weights} has no classifier: its classes are read from it")
    if num_old > num_classes:
        who = "the old model" if main else f"{key} {weights}"
        raise UserError(f"{who} has {num_old} classes but the new training list only "
                        f"{num_classes}: old classes must keep their ids 0..{num_old - 1}")
    old_model = load_trained_model(arch, weights, key, with_classifier=True, device=device, checkpoint=ckpt)
    old_model.eval().requires_grad_(False)
    meta = None
    if needs_meta(cfg.COMP_LOSS):
        if not meta_path:
            raise UserError(f"COMP_LOSS.TYPE {kind} needs the old-class meta: set {meta_key} "
                            f"(made by scripts/extract_meta.sh)")
        meta = load_meta(meta_path, device=device)
        covers, want = (("the old model has", num_old) if meta_classes(cfg.COMP_LOSS) == "old" else
                        ("DATA.TRAIN_LIST has", num_classes))
        if meta.num_classes != want:
            raise UserError(f"{meta_key} {meta_path} holds {meta.num_classes} classes but {covers} "
                            f"{want}")
    old_weight = old_model.classifier.weight.detach() if old_model.classifier is not None else None
    loss = build_compat_loss(cfg.COMP_LOSS, embed_dim=cfg.MODEL.EMB_DIM, num_old_classes=num_old,
                             total_epochs=cfg.TRAIN.EPOCHS, meta=meta,
                             old_classifier_weight=old_weight, classifier=cfg.LOSS.TYPE,
                             scale=cfg.LOSS.SCALE, margin=cfg.LOSS.MARGIN)
    return old_model, loss.to(device)


def build_teacher(cfg, device):
    """The frozen model whose embeddings of each batch the configured method reads (BT²'s φ*, MODEL.ARCH), or
    None; its embedding size must be MODEL.EMB_DIM, the size of the new branch it is matched to."""
    found = teacher_checkpoint(cfg.COMP_LOSS)
    if found is None:
        return None
    key, path = found
    teacher = load_trained_model(cfg.MODEL.ARCH, path, key, device=device)
    if teacher.embed_dim != cfg.MODEL.EMB_DIM:
        raise UserError(f"{key} {path} embeds to {teacher.embed_dim} dims but MODEL.EMB_DIM is {cfg.MODEL.EMB_DIM}: "
                        "the new branch is matched to its embeddings")
    return teacher.eval().requires_grad_(False)
