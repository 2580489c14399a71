"""Embed the old model's training list with the frozen old model and write the class meta file."""

import torch

from advbct import distributed as dist
from advbct.data.decoding import image_input
from advbct.data.image_list import ImageListDataset, read_image_list
from advbct.data.workers import resolve_num_workers
from advbct.errors import UserError
from advbct.evaluation.features import extract_features
from advbct.losses.build import meta_classes
from advbct.meta import compute_meta, save_meta
from advbct.models import checkpoint_shapes, load_trained_model, read_checkpoint


def extract_meta(cfg, progress=True):
    """Features of META.TRAIN_LIST by OLD_MODEL -> per-class centers and radii -> COMP_LOSS.META_PATH; for a
    method whose meta covers every training class (COMP_LOSS.TYPE bt2), of DATA.TRAIN_LIST instead.

    Every rank embeds a shard; rank 0 gathers the features, computes the meta, writes it and returns it
    (the other ranks return None once it is written). NaN/inf features are refused before anything is
    written, on every rank."""
    out = cfg.COMP_LOSS.META_PATH
    if not out:
        raise UserError("COMP_LOSS.META_PATH is empty: where should the meta file be written?")
    every_class = meta_classes(cfg.COMP_LOSS) == "train"
    key, listed = ("DATA", cfg.DATA) if every_class else ("META", cfg.META)
    if not listed.TRAIN_LIST:
        raise UserError(f"{key}.TRAIN_LIST is empty: give the " + (
            f"new model's training list (COMP_LOSS.TYPE {cfg.COMP_LOSS.TYPE} reads its classes' centers)"
            if every_class else "old model's training list"))
    _, _, device = dist.init_distributed()
    images = image_input(cfg.DATA.IMG_SIZE, cfg.DATA.DECODE, device)
    old = read_checkpoint(cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS")  # read once: its shapes, then its weights
    if every_class:
        num_classes = cfg.MODEL.NUM_CLASSES or None
        paths, labels = read_image_list(cfg.DATA.TRAIN_LIST, root=cfg.DATA.ROOT, num_classes=num_classes)
    else:
        num_classes = (cfg.OLD_MODEL.NUM_CLASSES or checkpoint_shapes(cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS",
                                                                      checkpoint=old)[1] or None)
        paths, labels = read_image_list(cfg.META.TRAIN_LIST, root=cfg.META.ROOT or cfg.DATA.ROOT,
                                        num_classes=num_classes)
    num_classes = num_classes or int(labels.max()) + 1
    model = load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", device=device,
                               checkpoint=old)
    dataset = ImageListDataset(paths, labels, image_input=images)
    feats = extract_features(model, dataset, batch_size=cfg.EVAL.BATCH_SIZE,
                             num_workers=resolve_num_workers(cfg.EVAL.NUM_WORKERS, "EVAL.NUM_WORKERS"), device=device, amp=cfg.EVAL.AMP,
                             desc="embed old training set", progress=progress)
    written = {}

    def compute_and_write():  # rank 0; its error (e.g. NaN features) reaches every rank, nothing written
        written["meta"] = compute_meta(feats, torch.as_tensor(labels), num_classes,
                                       source=f"OLD_MODEL.WEIGHTS {cfg.OLD_MODEL.WEIGHTS}")
        save_meta(out, written["meta"])

    dist.run_on_main(compute_and_write)
    return written.get("meta")
