"""Image lists: parsing of 'path label' files, the image Dataset (decode, crop, errors) and transforms."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from advbct.data.decoding import ImageInput
from advbct.data.image_list import ImageListDataset, load_image, read_image_list
from advbct.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from advbct.errors import UserError


def _write(path, text):
    path.write_text(text)
    return path


def test_read_image_list_values_root_and_blank_lines(tmp_path):
    f = _write(tmp_path / "list.txt", "train/a/b/c/abc1.jpg 3\n\n/abs/x.jpg 0\r\n  train/d/e/f/def9.jpg\t12  \n")
    paths, labels = read_image_list(f, root="/data/GLDv2")
    assert paths.tolist() == ["/data/GLDv2/train/a/b/c/abc1.jpg", "/abs/x.jpg", "/data/GLDv2/train/d/e/f/def9.jpg"]
    assert labels.dtype == np.int64 and labels.tolist() == [3, 0, 12]
    paths, _ = read_image_list(f)  # no root: paths exactly as written
    assert paths.tolist() == ["train/a/b/c/abc1.jpg", "/abs/x.jpg", "train/d/e/f/def9.jpg"]


@pytest.mark.parametrize("text", ["", "\n\n", "  \n\t\n"])
def test_read_image_list_without_entries_is_refused(tmp_path, text):
    """A list with no entry trains or embeds nothing: refused in one line naming the file."""
    path = _write(tmp_path / "empty.txt", text)
    with pytest.raises(UserError, match=f"^{path}: image list has no entries"):
        read_image_list(path)


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("a.jpg 1\nb.jpg\n", 2, "2 fields"),
        ("a.jpg 1\n\nb.jpg 2 7\n", 3, "got 3 fields"),
        ("a.jpg 1\nb.jpg x\n", 2, "not a non-negative integer"),
        ("a.jpg -1\n", 1, "not a non-negative integer"),
        ("a.jpg 1\nb.jpg 99999999999999999999\n", 2, "not a non-negative integer"),
    ],
)
def test_read_image_list_malformed_line_names_file_and_line(tmp_path, text, line, what):
    f = _write(tmp_path / "bad.txt", text)
    with pytest.raises(UserError) as err:
        read_image_list(f)
    assert f"{f}:{line}:" in str(err.value) and what in str(err.value)


def test_read_image_list_label_out_of_range(tmp_path):
    f = _write(tmp_path / "l.txt", "a.jpg 0\nb.jpg 4\nc.jpg 5\nd.jpg 6\n")
    assert read_image_list(f, num_classes=7)[1].tolist() == [0, 4, 5, 6]
    with pytest.raises(UserError) as err:
        read_image_list(f, num_classes=5)
    msg = str(err.value)
    assert f"{f}:3:" in msg and "label 5 >= num_classes (5)" in msg and "2 line(s)" in msg


def test_read_image_list_missing_file(tmp_path):
    with pytest.raises(UserError, match="Dataset.md"):
        read_image_list(tmp_path / "nope.txt")


def test_read_image_list_is_vectorised(tmp_path):
    n = 200_000
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 81313, n)
    text = "".join(f"train/{i % 7}/{i % 5}/{i % 3}/{i:016x}.jpg {l}\n" for i, l in enumerate(labels.tolist()))
    f = _write(tmp_path / "big.txt", text)
    start = time.perf_counter()
    paths, parsed = read_image_list(f, num_classes=81313)
    elapsed = time.perf_counter() - start
    assert np.array_equal(parsed, labels) and paths[12345] == f"train/{12345 % 7}/0/0/{12345:016x}.jpg"
    assert elapsed < 5.0, f"parsing {n} lines took {elapsed:.1f}s (1.58 M lines must take seconds)"


def _solid(path, colour, size=(10, 6), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return str(path)


def _normalised(rgb):
    return [(c / 255.0 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)]


def test_dataset_items_are_uint8_label_index_and_batches_normalise_on_the_device(tmp_path):
    a = _solid(tmp_path / "a.png", (255, 0, 128))
    b = _solid(tmp_path / "b.png", (10, 200, 30), size=(5, 17))
    ds = ImageListDataset([a, b], labels=[7, 2], image_input=ImageInput(8))
    img, label, index = ds[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8) and label == 2 and index == 1
    assert torch.equal(img, torch.tensor([10, 200, 30], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate)))
    assert batch[0].dtype == torch.uint8 and batch[0].shape == (2, 3, 8, 8)
    assert batch[1].tolist() == [7, 2] and batch[2].tolist() == [0, 1]
    x = ds.to_device(batch[0], "cpu", torch.channels_last)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected = torch.tensor([_normalised((255, 0, 128)), _normalised((10, 200, 30))], dtype=torch.float32)
    assert torch.allclose(x, expected[:, :, None, None].expand(2, 3, 8, 8), atol=1e-6)


def test_dataset_without_labels_and_with_root(tmp_path):
    _solid(tmp_path / "g.png", 77, mode="L")  # grayscale is converted to RGB
    ds = ImageListDataset(["g.png"], root=tmp_path, image_input=ImageInput(4, augment="flip"))
    img, label, index = ds[0]
    assert label == -1 and index == 0
    assert torch.equal(img, torch.full((3, 4, 4), 77, dtype=torch.uint8))


def test_crop_box_selects_region(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    path = tmp_path / "split.png"
    Image.fromarray(arr).save(path)
    crop = load_image(str(path), box=(20.4, 2.0, 39.6, 18.0))  # rounded like PIL/revisitop: (20, 2, 40, 18)
    assert crop.size == (20, 16)
    assert (np.asarray(crop) == (0, 0, 255)).all()
    ds = ImageListDataset([str(path)], boxes=[[0, 0, 20, 20]])
    assert (np.asarray(ds[0][0]) == (255, 0, 0)).all() and ds[0][0].size == (20, 20)


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError) as err:
        ImageListDataset([str(bad)])[0]
    assert str(bad) in str(err.value) and "corrupt" in str(err.value)
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(UserError, match="truncated.jpg"):
        load_image(str(truncated))
    with pytest.raises(UserError, match="missing.jpg.*Dataset.md"):
        load_image(str(tmp_path / "missing.jpg"))


def test_transform_sizes_and_bad_size():
    img = Image.new("RGB", (30, 11), (0, 0, 0))
    assert eval_transform(16)(img).shape == (3, 16, 16) and eval_transform(16)(img).dtype == torch.uint8
    assert eval_transform((12, 20))(img).shape == (3, 12, 20)
    with pytest.raises(UserError):
        eval_transform(0)


def _halves(path):
    """40x40 image, left half red, right half blue."""
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    Image.fromarray(arr).save(path)
    return Image.open(path).convert("RGB")


def test_train_transform_none_is_the_eval_pipeline(tmp_path):
    img = _halves(tmp_path / "h.png")
    assert torch.equal(train_transform(8)(img), eval_transform(8)(img))
    assert torch.equal(train_transform(8, "none", [0.1, 0.2])(img), eval_transform(8)(img))


def test_train_transform_flip_gives_the_image_or_its_mirror(tmp_path):
    img = _halves(tmp_path / "h.png")
    plain = eval_transform(8)(img)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = train_transform(8, "flip")(img)
        if torch.equal(out, plain):
            seen.add("plain")
        elif torch.equal(out, torch.flip(plain, dims=[2])):
            seen.add("mirror")
        else:
            raise AssertionError(f"seed {seed}: neither the image nor its mirror")
    assert seen == {"plain", "mirror"}


def test_train_transform_crop_flip_zooms_into_the_image(tmp_path):
    img = _halves(tmp_path / "h.png")
    red = torch.tensor([255.0, 0.0, 0.0])
    blue = torch.tensor([0.0, 0.0, 255.0])
    outs = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = train_transform(16, "crop_flip", [0.2, 0.3])(img)
        assert out.shape == (3, 16, 16)
        # every output column is (up to the resampled border) one colour of the image, no padding
        col = out.float().mean(dim=1)  # (3, 16)
        is_red = (col - red[:, None]).abs().amax(0) < 0.5
        is_blue = (col - blue[:, None]).abs().amax(0) < 0.5
        assert int((is_red | is_blue).sum()) >= 14
        outs.append(out)
    # a crop of at most 30 % of the area: some crops lie in one half only, and crops differ
    assert any(bool((o - red[:, None, None]).abs().amax() < 0.5) or bool((o - blue[:, None, None]).abs().amax() < 0.5)
               for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("augment, scale, what", [("jitter", [0.5, 1.0], "DATA.AUGMENT must be one of"),
                                                  ("crop_flip", [0.8, 0.5], "DATA.CROP_SCALE"),
                                                  ("crop_flip", [0.0, 1.0], "DATA.CROP_SCALE"),
                                                  ("crop_flip", [0.5], "DATA.CROP_SCALE")])
def test_train_transform_rejects_bad_settings(augment, scale, what):
    with pytest.raises(UserError, match=what):
        train_transform(8, augment, scale)
