"""Image transforms of the original code: resize the whole image, ToTensor, ImageNet normalisation.

No augmentation and no aspect-preserving resize (PAPER.md, "Model (code)"); training and evaluation
use the same pipeline. ``DATA.AUGMENT`` adds an optional training augmentation (not in the paper; it
lowered every test of the synthetic R50 blocks, docs/REPRODUCTION.md, 2026-12-02).

The transforms here end in uint8 tensors: DataLoader workers hand over 1 byte per pixel value instead of
4 (a float32 batch of 256 at 224 px is 154 MB in shared memory), and :func:`normalise` does ToTensor's
scaling and Normalize's arithmetic on the training device, with the same float32 operations in the same
order, hence the same numbers.
"""

import functools

import torch
from torchvision import transforms as T

from advbct.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratios of crop_flip's random crops (torchvision's default)


def as_hw(size):
    """``size`` (int or (h, w)) as a validated (h, w) tuple."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise UserError(f"image size must be a positive int or (height, width), got {size!r}")
    return hw


def eval_transform(size=224):
    """PIL image -> uint8 tensor of shape (3, h, w), the whole image resized to ``size`` (PIL bilinear)."""
    return T.Compose([T.Resize(as_hw(size), interpolation=T.InterpolationMode.BILINEAR), T.PILToTensor()])


AUGMENTS = ("none", "flip", "crop_flip")


def check_augment(augment, crop_scale):
    """DATA.AUGMENT and DATA.CROP_SCALE validated (one line naming the key)."""
    if augment not in AUGMENTS:
        raise UserError(f"DATA.AUGMENT must be one of {', '.join(AUGMENTS)}, got '{augment}'")
    if augment == "crop_flip" and (len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0):
        raise UserError(f"DATA.CROP_SCALE must be [min, max] with 0 < min <= max <= 1, got {list(crop_scale)}")


def train_transform(size=224, augment="none", crop_scale=(0.5, 1.0)):
    """Training transform to uint8. ``augment`` 'none' is :func:`eval_transform` (the original trains without
    augmentation); 'flip' adds a random horizontal flip; 'crop_flip' first takes a random crop of
    ``crop_scale`` of the image area (aspect 3/4..4/3) resized to ``size``, as torchvision's recipes."""
    check_augment(augment, crop_scale)
    if augment == "none":
        return eval_transform(size)
    hw, bilinear = as_hw(size), T.InterpolationMode.BILINEAR
    if augment == "flip":
        first = T.Resize(hw, interpolation=bilinear)
    else:
        first = T.RandomResizedCrop(hw, scale=tuple(crop_scale), ratio=CROP_RATIO, interpolation=bilinear)
    return T.Compose([first, T.RandomHorizontalFlip(), T.PILToTensor()])


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def normalise(images):
    """Batch ``(n, 3, h, w)`` of pixel values in [0, 255] (uint8 or float) -> float32 ``(x / 255 - mean) / std``
    on the batch's device: ToTensor's division, then Normalize's subtraction and division."""
    mean, std = _mean_std(images.device)
    return images.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)
