"""Batched, rank-sharded feature extraction.

Each rank embeds one contiguous shard of the dataset; the shards are gathered in rank order onto rank 0,
the one rank that searches or computes the meta (no ``.npy`` round trip as in the original release; the
761,757 x 256 GLDv2 index is held by one process, not by every rank and GPU).
"""

import contextlib

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from advbct import distributed as dist
from advbct.errors import UserError, one_line


def shard_bounds(n: int, rank: int, world: int):
    """Contiguous ``[start, end)`` of ``n`` items for ``rank``; shard sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _raise_on_any_rank(error):
    """Raise the first rank's UserError on every rank, so that no rank waits in the gather for a rank
    that failed (the whole job then ends with that one message instead of a collective timeout)."""
    if dist.is_distributed():
        error = next((e for e in dist.all_gather_object(error) if e is not None), None)
    if error is not None:
        raise UserError(error)


@torch.no_grad()
def extract_features(model, dataset, *, batch_size=64, num_workers=4, device=None, amp=False,
                     desc="extract", progress=True):
    """Embed every item of ``dataset`` with ``model``; return a float32 CPU tensor ``(len(dataset), D)``
    on rank 0 and None on the other ranks.

    ``dataset`` is an :class:`~advbct.data.image_list.ImageListDataset` with an image input: its ``collate``
    batches the items, its ``to_device`` makes normalised model input; ``model.embed(images)`` is the
    (un-normalised) embedding (no classifier logits). ``amp`` runs the forward under bf16 autocast. Works
    unchanged on 1 or N ranks.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images_of = dataset
    while isinstance(images_of, Subset):  # a part of a dataset batches and moves its images as the whole
        images_of = images_of.dataset
    rank, world = dist.get_rank(), dist.get_world_size()
    start, end = shard_bounds(len(dataset), rank, world)
    loader = DataLoader(Subset(dataset, range(start, end)), batch_size=batch_size, shuffle=False,
                        collate_fn=images_of.collate, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp
                else contextlib.nullcontext())
    chunks, error = [], None
    bar = tqdm(loader, desc=desc, disable=not (progress and dist.is_main_process()), leave=False)
    try:
        with autocast:
            for images, _, _ in bar:
                feat = model.embed(images_of.to_device(images, device))
                chunks.append(feat.float())
    except UserError as exc:  # e.g. an unreadable image in this rank's shard
        error = one_line(str(exc))
    finally:
        model.train(was_training)
    _raise_on_any_rank(error)
    dim = model.embed_dim
    local = torch.cat(chunks) if chunks else torch.zeros(0, dim, device=device)
    features = dist.gather_to_main(local)
    return None if features is None else features.cpu()
