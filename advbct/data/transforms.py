"""Image transforms of the original code: resize the whole image, ToTensor, ImageNet normalisation.

No augmentation and no aspect-preserving resize (PAPER.md, "Model (code)"); training and evaluation
use the same pipeline.
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


def train_transform(size=224):
    """Training transform: identical to :func:`eval_transform` (the original trains without augmentation)."""
    return eval_transform(size)
