"""How an image file becomes model input (``DATA.DECODE``), for training, meta extraction and evaluation.

- ``pil``: the release's. PIL decodes the whole image, resizes it (bilinear) and the worker hands over a
  uint8 tensor; normalisation runs on the device (:func:`advbct.data.transforms.normalise`).
- ``pil_draft``: the same, but a JPEG is first decoded at 1/2, 1/4 or 1/8 of its size in the DCT domain
  (PIL's ``draft``), never below what the resize (or the crop) needs: less work per image, slightly
  different pixels (docs/BENCHMARKS.md gives the cost in pixels and embeddings).
- ``nvjpeg``: workers only read the file's bytes and draw the crop and flip; the batch is decoded on the
  CUDA device (``torchvision.io.decode_jpeg``), cropped, resized (bilinear, antialiased like PIL's),
  flipped and normalised there. JPEG files only.

The random crop and flip draw the same random numbers in the same order in every mode, so a seeded run
augments the same way whichever decoder it uses.
"""

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from advbct.data.image_list import crop_box, load_image, opened_image
from advbct.data.transforms import CROP_RATIO, as_hw, check_augment, normalise, train_transform
from advbct.errors import UserError

DECODE_MODES = ("pil", "pil_draft", "nvjpeg")
KEY = "DATA.DECODE"


def check_mode(mode):
    if mode not in DECODE_MODES:
        raise UserError(f"{KEY} '{mode}': expected one of {', '.join(DECODE_MODES)}")


def check_device(mode, device):
    """The rule of ``nvjpeg``: it decodes on a CUDA device, so a process on another device refuses it."""
    check_mode(mode)
    if mode == "nvjpeg" and torch.device(device).type != "cuda":
        raise UserError(f"{KEY} nvjpeg decodes on a CUDA GPU, but this process runs on "
                        f"{torch.device(device).type} (no CUDA device): use {KEY} pil or pil_draft")


class EncodedBatch(NamedTuple):
    """A batch as ``nvjpeg`` workers hand it over: file bytes, and per image the pixel box to keep
    (x1, y1, x2, y2, in the full image) and whether to mirror it."""

    data: list  # uint8 1-D CPU tensors, one per image
    boxes: torch.Tensor  # (n, 4) int64
    flips: torch.Tensor  # (n,) bool
    paths: list  # for error messages


@dataclass(frozen=True)
class ImageInput:
    """Decoding mode, output size and training augmentation of one dataset (see the module docstring).

    Built without a device check, so that the GPU path's arithmetic can be run on a CPU device in tests;
    :func:`image_input` is the checked constructor the entry points use.
    """

    size: tuple  # (h, w)
    decode: str = "pil"
    augment: str = "none"
    crop_scale: tuple = (0.5, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "size", as_hw(self.size))
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        check_mode(self.decode)
        check_augment(self.augment, self.crop_scale)
        if self.decode != "nvjpeg":  # the PIL transform, built once (not per item)
            object.__setattr__(self, "_transform", train_transform(self.size, self.augment, self.crop_scale))

    # ------------------------------------------------------------------ in the DataLoader workers
    def _draft_size(self):
        """(w, h) the decoded region must keep: the output size, divided by the side of the smallest
        random crop (a square image's smallest area at the narrowest aspect) under crop_flip."""
        h, w = self.size
        if self.augment == "crop_flip":
            side = (self.crop_scale[0] * CROP_RATIO[0]) ** 0.5
            return (int(np.ceil(w / side)), int(np.ceil(h / side)))
        return (w, h)

    def read(self, path, box=None):
        """One image file -> a uint8 ``(3, h, w)`` tensor (``pil``, ``pil_draft``), or ``(bytes, box, flip)``
        for ``nvjpeg``."""
        if self.decode == "nvjpeg":
            return self._read_encoded(path, box)
        draft = self._draft_size() if self.decode == "pil_draft" else None
        return self._transform(load_image(path, box, draft=draft))

    def _read_encoded(self, path, box):
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise UserError(f"{path}: image not found (see Dataset.md)") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read image ({exc.strerror})") from None
        with opened_image(path, data.tobytes()) as img:  # the header only: size and format, no pixel decoded
            fmt, (w, h) = img.format, img.size
            x1, y1, x2, y2 = (0, 0, w, h) if box is None else crop_box(box, w, h)
            flip = False
            if self.augment == "crop_flip":  # the same draws as T.RandomResizedCrop + T.RandomHorizontalFlip
                region = torch.empty(1, 1, 1).expand(1, y2 - y1, x2 - x1)  # its shape only, no memory
                i, j, ch, cw = T.RandomResizedCrop.get_params(region, list(self.crop_scale), list(CROP_RATIO))
                x1, y1, x2, y2 = x1 + j, y1 + i, x1 + j + cw, y1 + i + ch
            if self.augment != "none":
                flip = bool(torch.rand(1) < 0.5)
        if fmt != "JPEG":
            raise UserError(f"{path}: {fmt} image, but {KEY} nvjpeg decodes JPEG files only: use {KEY} pil")
        return torch.from_numpy(data), (x1, y1, x2, y2), flip, path

    # ------------------------------------------------------------------ batching
    def collate(self, items):
        """``(image, label, index)`` items -> ``(images, labels, indices)``; images stacked (uint8) or, for
        ``nvjpeg``, an :class:`EncodedBatch`."""
        if self.decode != "nvjpeg":
            return torch.utils.data.default_collate(items)
        encoded, labels, indices = zip(*items)
        data, boxes, flips, paths = zip(*encoded)
        batch = EncodedBatch(list(data), torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4),
                             torch.tensor(flips, dtype=torch.bool), list(paths))
        return batch, torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64)

    # ------------------------------------------------------------------ on the device
    def to_device(self, images, device, memory_format=torch.contiguous_format):
        """A collated batch -> normalised float32 ``(n, 3, h, w)`` on ``device``."""
        if isinstance(images, EncodedBatch):
            pixels = decode_on_device(images, self.size, device)
        else:
            pixels = images.to(device, non_blocking=True)
        return normalise(pixels).contiguous(memory_format=memory_format)


def image_input(size, decode="pil", device="cpu", augment="none", crop_scale=(0.5, 1.0)):
    """An :class:`ImageInput` for a process on ``device``; ``nvjpeg`` off CUDA is refused in one line."""
    check_device(decode, device)
    return ImageInput(size, decode, augment, tuple(crop_scale))


def _decode_jpegs(batch, device):
    """The batch's JPEGs decoded to RGB uint8 ``(3, H, W)`` tensors on ``device``, in one batched call; where
    that fails (e.g. a CMYK file the GPU decoder refuses), image by image on the CPU, naming a bad file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            return decode_jpeg(batch.data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        images = []
        for data, path in zip(batch.data, batch.paths):  # the error path only
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB).to(device))
                except RuntimeError as exc:
                    raise UserError(f"{path}: unreadable or corrupt JPEG ({str(exc).splitlines()[0]})") from None
        return images


def decode_on_device(batch, size, device):
    """:class:`EncodedBatch` -> float32 pixel values ``(n, 3, h, w)`` in [0, 255] on ``device``: decode, crop to
    each box, resize (bilinear with PIL's antialiasing, rounded to integers as PIL's uint8 output), mirror."""
    device = torch.device(device)
    images = _decode_jpegs(batch, device)
    h, w = size
    out = torch.empty(len(images), 3, h, w, dtype=torch.float32, device=device)
    # the decoder returns one tensor per image (sizes differ): crop views per image, then one resize per
    # distinct region shape
    regions = [img[:, y1:y2, x1:x2] for img, (x1, y1, x2, y2) in zip(images, batch.boxes.tolist())]
    groups = {}
    for i, region in enumerate(regions):
        groups.setdefault(tuple(region.shape[1:]), []).append(i)
    for idx in groups.values():
        stack = torch.stack([regions[i] for i in idx]).to(torch.float32)
        out[idx] = F.interpolate(stack, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    out.round_().clamp_(0, 255)
    flips = batch.flips.to(device)
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
