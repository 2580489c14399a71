"""Feature extraction sharded over 2 gloo processes equals single-process extraction, in dataset order, on rank 0."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advbct.data.decoding import ImageInput
from advbct.data.image_list import ImageListDataset
from advbct.evaluation.features import extract_features, shard_bounds
from advbct.evaluation.protocol import load_test_set
from advbct.models import build_model
from helpers import free_port

WORLD, N_IMAGES, IMG, BATCH = 2, 13, 32, 4  # 13 images: shards of 7 and 6, several batches each


def dataset(root):
    paths = load_test_set("roxford5k", root, check_images=False).gallery_paths[:N_IMAGES]
    return ImageListDataset(paths, image_input=ImageInput(IMG))


def make_model():
    """A random model left in TRAINING mode: extraction must switch BatchNorm to its running statistics
    (else a feature would depend on the other images of its batch, i.e. on the sharding)."""
    torch.manual_seed(0)
    model = build_model("resnet18", embed_dim=16, pretrained=False)
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode really differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.train()


def _worker(rank, port, root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), CUDA_VISIBLE_DEVICES="")  # CPU + gloo on any machine
    torch.set_num_threads(1)
    from advbct.distributed import cleanup, get_world_size, init_distributed

    _, world, device = init_distributed()
    try:
        assert world == WORLD == get_world_size() and device.type == "cpu"
        model = make_model()
        feats = extract_features(model, dataset(root), batch_size=BATCH, num_workers=0, progress=False)
        torch.save({"feats": feats, "training_after": model.training}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()



def test_shard_bounds_cover_dataset_in_order():
    for n in (0, 1, 13, 16):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert [i for s, e in bounds for i in range(s, e)] == list(range(n))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert [shard_bounds(13, r, 2) for r in range(2)] == [(0, 7), (7, 13)]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_extraction_equals_single_process(tiny_synthetic, tmp_path):
    root = str(tiny_synthetic / "ROxfordParis")
    mp.spawn(_worker, args=(free_port(), root, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model = make_model()
    single = extract_features(model, dataset(root), batch_size=BATCH, num_workers=0, device="cpu",
                              progress=False)
    assert model.training  # the caller's mode is restored
    assert single.shape == (N_IMAGES, 16) and single.dtype == torch.float32
    # rank 0 (the one that searches) ends with the whole dataset in dataset order, the others with None
    torch.testing.assert_close(ranks[0]["feats"], single, atol=1e-6, rtol=0)
    assert ranks[1]["feats"] is None
    assert all(r["training_after"] is True for r in ranks)

    # dataset order, per image: each row is that image embedded alone in eval mode
    ds = dataset(root)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(ds.to_device(ds[i][0][None], "cpu"))["feat"] for i in range(N_IMAGES)])
    torch.testing.assert_close(single, alone, atol=1e-5, rtol=1e-5)
    # rows are distinct, so a shuffled order could not pass
    assert torch.cdist(single, single).add(torch.eye(N_IMAGES) * 1e9).min() > 1e-3
