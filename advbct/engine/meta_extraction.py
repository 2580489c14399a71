"""Embed the old model's training list with the frozen old model and write the class meta file."""

import torch

from advbct import distributed as dist
from advbct.data.decoding import image_input
from advbct.data.image_list import ImageListDataset, read_image_list
from advbct.data.workers import resolve_num_workers
from advbct.errors import UserError
from advbct.evaluation.features import extract_features
from advbct.meta import compute_meta, save_meta
from advbct.models import checkpoint_shapes, load_trained_model


def extract_meta(cfg, progress=True):
    """Features of META.TRAIN_LIST by OLD_MODEL -> per-class centers and radii -> COMP_LOSS.META_PATH.

    Every rank embeds a shard; rank 0 gathers the features, computes the meta, writes it and returns it
    (the other ranks return None once it is written). NaN/inf features are refused before anything is
    written, on every rank."""
    out = cfg.COMP_LOSS.META_PATH
    if not out:
        raise UserError("COMP_LOSS.META_PATH is empty: where should the meta file be written?")
    if not cfg.META.TRAIN_LIST:
        raise UserError("META.TRAIN_LIST is empty: give the old model's training list")
    _, _, device = dist.init_distributed()
    images = image_input(cfg.DATA.IMG_SIZE, cfg.DATA.DECODE, device)
    _, old_classes = checkpoint_shapes(cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS")
    num_classes = cfg.OLD_MODEL.NUM_CLASSES or old_classes or None
    paths, labels = read_image_list(cfg.META.TRAIN_LIST, root=cfg.META.ROOT or cfg.DATA.ROOT,
                                    num_classes=num_classes)
    num_classes = num_classes or int(labels.max()) + 1
    model = load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", device=device)
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
