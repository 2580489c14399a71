"""Image transforms of the original code: resize the whole image, ToTensor, ImageNet normalisation.

No augmentation and no aspect-preserving resize (PAPER.md, "Model (code)"); training and evaluation
use the same pipeline. ``DATA.AUGMENT`` adds an optional training augmentation (not in the paper; it
lowered every test of the synthetic R50 blocks, docs/REPRODUCTION.md, 2026-12-02).
"""

from torchvision import transforms as T

from advbct.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_hw(size):
    """``size`` (int or (h, w)) as a validated (h, w) tuple."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise UserError(f"image size must be a positive int or (height, width), got {size!r}")
    return hw


def eval_transform(size=224):
    """PIL image -> normalised float tensor of shape (3, h, w), the whole image resized to ``size``."""
    return T.Compose(
        [
            T.Resize(_as_hw(size), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


AUGMENTS = ("none", "flip", "crop_flip")


def train_transform(size=224, augment="none", crop_scale=(0.5, 1.0)):
    """Training transform. ``augment`` 'none' is :func:`eval_transform` (the original trains without
    augmentation); 'flip' adds a random horizontal flip; 'crop_flip' first takes a random crop of
    ``crop_scale`` of the image area (aspect 3/4..4/3) resized to ``size``, as torchvision's recipes."""
    if augment not in AUGMENTS:
        raise UserError(f"DATA.AUGMENT must be one of {', '.join(AUGMENTS)}, got '{augment}'")
    if augment == "none":
        return eval_transform(size)
    hw, bilinear = _as_hw(size), T.InterpolationMode.BILINEAR
    if augment == "flip":
        first = T.Resize(hw, interpolation=bilinear)
    else:
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise UserError(f"DATA.CROP_SCALE must be [min, max] with 0 < min <= max <= 1, got {list(crop_scale)}")
        first = T.RandomResizedCrop(hw, scale=tuple(crop_scale), interpolation=bilinear)
    return T.Compose([first, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
