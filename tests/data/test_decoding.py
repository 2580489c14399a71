"""Decoding modes (DATA.DECODE): pil is the former pipeline to the bit, pil_draft and the nvjpeg path's
arithmetic (run here on a CPU device) stay within bounded pixel differences, the workers' and collate's
parts of nvjpeg, and the refusals."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from advbct.data.decoding import EncodedBatch, ImageInput, check_device, decode_on_device, image_input
from advbct.data.image_list import ImageListDataset, load_image
from advbct.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from advbct.errors import UserError


def _photo(path, size, seed=0, quality=90):
    """A JPEG with smooth structure and fine texture (w x h = ``size``), so that resampling matters."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / (17 + 9 * c) + yy / (23 + 5 * c) + c) for c in range(3)], -1)
    noise = rng.normal(0, 12, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return str(path)


def _former(size):
    """The pipeline before uint8 batches: PIL resize, ToTensor, Normalize, all in the worker."""
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _batch(ds, n=None):
    items = [ds[i] for i in range(n or len(ds))]
    return ds.collate(items)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    return [_photo(d / "a.jpg", (1024, 768), 0), _photo(d / "b.jpg", (640, 480), 1),
            _photo(d / "c.jpg", (300, 400), 2), _photo(d / "d.jpg", (1024, 768), 3)]


def test_pil_is_the_former_pipeline_to_the_bit(photos):
    ds = ImageListDataset(photos, labels=[0, 1, 2, 3], image_input=ImageInput(64))
    images, labels, index = _batch(ds)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 64, 64)
    x = ds.to_device(images, "cpu")
    former = torch.stack([_former(64)(Image.open(p).convert("RGB")) for p in photos])
    assert torch.equal(x, former)  # bitwise: the same float32 operations in the same order


def test_pil_draft_decodes_smaller_but_never_below_the_output(photos):
    # 1024x768 for 224 px: 1024 // 224 = 4, 768 // 224 = 3, so the 1/2 scale: 512 x 384
    assert load_image(photos[0], draft=(224, 224)).size == (512, 384)
    assert load_image(photos[0], draft=(64, 64)).size == (128, 96)  # 1/8
    assert load_image(photos[2], draft=(224, 224)).size == (300, 400)  # less than twice the output: whole
    # a box keeps at least the output size: region 200 x 150 of 1024 x 768 needs the full scale for 224 px
    assert load_image(photos[0], box=(100, 100, 300, 250), draft=(224, 224)).size == (200, 150)
    # ... and at 64 px the 1/2 scale, the box scaled with it: 100 x 75 (rounded like revisitop)
    crop = load_image(photos[0], box=(100, 100, 300, 250), draft=(64, 64))
    assert crop.size == (100, 75)
    full = load_image(photos[0], box=(100, 100, 300, 250)).resize((100, 75), Image.BILINEAR)
    assert np.abs(np.asarray(crop, np.float32) - np.asarray(full, np.float32)).mean() < 6


def test_pil_draft_pixels_stay_close_to_pil(photos):
    for size in (224, 64):
        pil = _batch(ImageListDataset(photos, image_input=ImageInput(size)))[0].float()
        draft = _batch(ImageListDataset(photos, image_input=ImageInput(size, "pil_draft")))[0].float()
        diff = (pil - draft).abs()
        assert torch.equal(pil[2], draft[2]) if size == 224 else True  # not reduced: identical
        assert 0 < diff.mean() < 3.0, (size, float(diff.mean()))  # differs, by little (0-255 scale)


def test_nvjpeg_workers_read_bytes_and_geometry(photos):
    ds = ImageListDataset(photos[:2], labels=[5, 6], boxes=[[10.4, 20, 500, 400], [0, 0, 9999, 9999]],
                          image_input=ImageInput(32, "nvjpeg"))
    data, box, flip, path = ds[0][0]
    with open(photos[0], "rb") as f:
        assert bytes(data.numpy()) == f.read()
    assert box == (10, 20, 500, 400) and flip is False and path == photos[0]
    assert ds[1][0][1] == (0, 0, 640, 480)  # clipped to the image, read from the header
    batch, labels, index = _batch(ds)
    assert isinstance(batch, EncodedBatch) and len(batch.data) == 2
    assert batch.boxes.tolist() == [[10, 20, 500, 400], [0, 0, 640, 480]] and batch.flips.tolist() == [False, False]
    assert labels.tolist() == [5, 6] and index.tolist() == [0, 1]
    # what pin_memory and the DataLoader do to a batch keeps it usable
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate, num_workers=1)
    batch2, _, _ = next(iter(loader))
    assert all(torch.equal(a, b) for a, b in zip(batch.data, batch2.data)) and torch.equal(batch.boxes, batch2.boxes)


def test_nvjpeg_path_on_a_cpu_device_matches_pil_within_rounding(photos):
    """The GPU path's arithmetic (batched decode, crop, antialiased resize, rounding, normalisation) with the
    CPU decoder: a tenth of a level from PIL on average (antialiased bilinear, as PIL's), 2 at most."""
    boxes = [[0, 0, 1024, 768], [0, 0, 640, 480], [30, 40, 290, 380], [0, 0, 1024, 768]]
    for size in (224, 64):
        pil_ds = ImageListDataset(photos, boxes=boxes, image_input=ImageInput(size))
        gpu_ds = ImageListDataset(photos, boxes=boxes, image_input=ImageInput(size, "nvjpeg"))
        pil = _batch(pil_ds)[0].float()
        batch = _batch(gpu_ds)[0]
        pixels = decode_on_device(batch, (size, size), "cpu")
        assert pixels.shape == pil.shape and torch.equal(pixels, pixels.round())
        diff = (pixels - pil).abs()
        assert diff.mean() < 0.5 and diff.max() <= 2, (size, float(diff.mean()), float(diff.max()))
        x = gpu_ds.to_device(batch, "cpu")
        assert torch.allclose(x, pil_ds.to_device(pixels.to(torch.uint8), "cpu"), atol=1e-6)


@pytest.mark.parametrize("augment", ["flip", "crop_flip"])
def test_augmentation_draws_the_same_crops_and_flips_in_every_mode(photos, augment):
    """Seeded alike, pil and nvjpeg augment alike: the same mirrored images and the same crop regions."""
    kw = dict(augment=augment, crop_scale=(0.3, 0.6))
    pil_in, gpu_in = ImageInput(48, "pil", **kw), ImageInput(48, "nvjpeg", **kw)
    flips_seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        pil = torch.stack([pil_in.read(p) for p in photos]).float()
        torch.manual_seed(seed)
        batch = gpu_in.collate([(gpu_in.read(p), 0, i) for i, p in enumerate(photos)])[0]
        flips_seen.update(batch.flips.tolist())
        pixels = decode_on_device(batch, (48, 48), "cpu")
        # mirrored or another region would differ by tens of levels; the same one within resampling
        assert (pixels - pil).abs().mean(dim=(1, 2, 3)).max() < 2.5
    assert flips_seen == {True, False}


def test_nvjpeg_is_refused_off_cuda_and_for_other_formats(tmp_path):
    with pytest.raises(UserError, match=r"DATA.DECODE nvjpeg decodes on a CUDA GPU.*runs on cpu.*pil or pil_draft"):
        image_input(224, "nvjpeg", "cpu")
    with pytest.raises(UserError, match=r"DATA.DECODE 'turbo': expected one of pil, pil_draft, nvjpeg"):
        image_input(224, "turbo", "cpu")
    check_device("nvjpeg", torch.device("cuda", 3))  # the rule is about the device type only
    assert image_input(224, "pil_draft", "cpu").decode == "pil_draft"
    png = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(png)
    with pytest.raises(UserError, match=r"x.png: PNG image, but DATA.DECODE nvjpeg decodes JPEG files only"):
        ImageInput(16, "nvjpeg").read(str(png))
    with pytest.raises(UserError, match=r"missing.jpg: image not found"):
        ImageInput(16, "nvjpeg").read(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"bad.jpg: unreadable or corrupt image"):
        ImageInput(16, "nvjpeg").read(str(bad))


def test_a_corrupt_jpeg_body_names_the_file_at_decoding(tmp_path):
    good = _photo(tmp_path / "good.jpg", (320, 240))
    raw = open(good, "rb").read()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(raw[: len(raw) // 3])  # the header parses, the entropy-coded data ends early
    ds = ImageListDataset([good, str(cut)], image_input=ImageInput(16, "nvjpeg"))
    batch = _batch(ds)[0]
    with pytest.raises(UserError, match=r"cut.jpg: unreadable or corrupt JPEG") as err:
        decode_on_device(batch, (16, 16), "cpu")
    assert "good.jpg" not in str(err.value)


@pytest.mark.slow
def test_every_mode_on_the_tiny_benchmark(tiny_synthetic):
    """The tiny synthetic benchmark's ROxford gallery (64 px JPEGs) at 32 px: pil gives the former pipeline's
    tensors to the bit; pil_draft (decoded at half size) and the nvjpeg path stay within bounded differences."""
    from advbct.evaluation.protocol import image_datasets, load_test_set

    ts = load_test_set("roxford5k", str(tiny_synthetic / "ROxfordParis"))
    _, pil_ds = image_datasets(ts, ImageInput(32))
    pil = _batch(pil_ds)[0]
    former = torch.stack([_former(32)(Image.open(p).convert("RGB")) for p in ts.gallery_paths])
    assert torch.equal(pil_ds.to_device(pil, "cpu"), former)
    _, draft_ds = image_datasets(ts, ImageInput(32, "pil_draft"))
    assert load_image(ts.gallery_paths[0], draft=(32, 32)).size == (32, 32)  # 64 px: the 1/2 scale
    draft_diff = (_batch(draft_ds)[0].float() - pil.float()).abs()
    assert 0.5 < draft_diff.mean() < 6.0, float(draft_diff.mean())
    _, gpu_ds = image_datasets(ts, ImageInput(32, "nvjpeg"))
    gpu_diff = (decode_on_device(_batch(gpu_ds)[0], (32, 32), "cpu") - pil.float()).abs()
    assert gpu_diff.mean() < 0.5 and gpu_diff.max() <= 2, (float(gpu_diff.mean()), float(gpu_diff.max()))
