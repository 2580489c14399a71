"""Image lists: parse ``relative/path label`` files and serve the images as a torch Dataset.

The list format is the one of the original code (OpenCompatible / AdvBCT), e.g. GLDv2's
``label_81313.txt``: one ``train/6/2/d/62d0caa23ab29732.jpg 77574`` per line, path and integer
separated by whitespace. The GLDv2 test lists use the same format with the running index as the integer.
"""

import contextlib
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from advbct.errors import UserError

_BLANK_BYTE = np.zeros(256, dtype=bool)  # lookup table: ASCII whitespace (the separators of bytes.split)
_BLANK_BYTE[list(b" \t\n\r\x0b\x0c")] = True


def _tokens_per_line(data):
    """Number of whitespace-separated tokens on each line of ``data`` (bytes), vectorised with numpy."""
    buf = np.frombuffer(data, dtype=np.uint8)
    blank = _BLANK_BYTE[buf]
    # a token starts at a non-blank byte that is first in the buffer or follows a blank one
    is_start = ~blank
    is_start[1:] &= blank[:-1]
    newlines = np.flatnonzero(buf == ord("\n"))
    line_of_start = np.searchsorted(newlines, np.flatnonzero(is_start))  # newlines before = line index
    n_lines = len(newlines) + (1 if len(buf) and buf[-1] != ord("\n") else 0)
    return np.bincount(line_of_start, minlength=n_lines)


def _join_root(root, paths):
    """Prefix relative ``paths`` (numpy str array) with ``root``; absolute ones are kept (as os.path.join)."""
    if root is None or len(paths) == 0:
        return paths
    root = os.path.join(str(root), "")
    return np.where(np.char.startswith(paths, os.sep), paths, np.char.add(root, paths))


def read_image_list(path, root=None, num_classes=None):
    """Parse a ``path label`` list file into (paths: numpy str array, labels: int64 array).

    Blank lines are skipped. ``root`` is prepended to relative paths. A line without exactly two fields,
    a non-integer or negative label, or a label >= ``num_classes`` raises UserError naming file and line.
    """
    path = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: image list not found (see Dataset.md)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read image list ({exc.strerror})") from None

    counts = _tokens_per_line(data)
    bad = np.flatnonzero((counts != 0) & (counts != 2))
    if len(bad):
        line_no = int(bad[0]) + 1
        raise UserError(
            f"{path}:{line_no}: expected 'relative/path label' (2 fields), got {int(counts[bad[0]])} fields"
        )
    line_of_entry = np.flatnonzero(counts == 2)  # 0-based line index of every entry, for messages
    if len(line_of_entry) == 0:
        raise UserError(f"{path}: image list has no entries (expected 'relative/path label' lines)")
    tokens = data.split()
    raw_paths = np.array(tokens[0::2], dtype=bytes) if tokens else np.zeros(0, dtype="S1")
    raw_labels = np.array(tokens[1::2], dtype=bytes) if tokens else np.zeros(0, dtype="S1")

    try:
        labels = raw_labels.astype(np.int64)
        # astype accepts e.g. b"1e3" or b"+5" only partly; require plain digits for a clean format
        plain = np.char.isdigit(raw_labels)
        if not plain.all():
            raise ValueError
    except (ValueError, OverflowError):
        plain = np.array([t.isdigit() and int(t) < 2**63 for t in raw_labels.tolist()], dtype=bool)
        first = int(np.flatnonzero(~plain)[0])
        raise UserError(
            f"{path}:{int(line_of_entry[first]) + 1}: label {raw_labels[first].decode(errors='replace')!r} "
            "is not a non-negative integer"
        ) from None
    if num_classes is not None and len(labels):
        over = np.flatnonzero(labels >= num_classes)
        if len(over):
            first = int(over[0])
            raise UserError(
                f"{path}:{int(line_of_entry[first]) + 1}: label {int(labels[first])} >= num_classes "
                f"({num_classes}); {len(over)} line(s) out of range"
            )

    try:
        paths = raw_paths.astype(str)  # fast path: ASCII only
    except UnicodeDecodeError:
        try:
            paths = np.char.decode(raw_paths, "utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: image paths are not valid UTF-8") from None
    return _join_root(root, paths), labels


def crop_box(box, width, height):
    """``box`` = (x1, y1, x2, y2) in pixels, rounded as revisitop and clipped to a ``width`` x ``height``
    image (at least one pixel), so a sloppy box cannot fail."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = max(0, min(x1, width - 1)), max(1, min(x2, width))
    y1, y2 = max(0, min(y1, height - 1)), max(1, min(y2, height))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def _draft(img, box, min_size):
    """Ask the JPEG decoder of ``img`` for a 1/2, 1/4 or 1/8 scale (DCT-domain, PIL's ``draft``) that keeps
    the region ``box`` (or the whole image) at least ``min_size`` = (w, h) pixels; return ``box`` in the
    pixels of the reduced image."""
    w, h = img.size
    x1, y1, x2, y2 = (0, 0, w, h) if box is None else crop_box(box, w, h)
    # the whole image at this size keeps the region >= min_size; draft picks the largest scale 1/s with
    # ceil(w / s) >= requested width and the same for the height
    need = (-(-w * min_size[0] // (x2 - x1)), -(-h * min_size[1] // (y2 - y1)))
    img.draft("RGB", need)
    if box is None or img.size == (w, h):
        return box
    fx, fy = img.size[0] / w, img.size[1] / h
    return (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


@contextlib.contextmanager
def opened_image(path, data=None):
    """``Image.open`` of ``path`` (or of ``data``, its bytes already read): a missing file, or one found
    unreadable or corrupt inside the ``with`` block, ends in one line naming ``path``."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            yield img
    except FileNotFoundError:
        raise UserError(f"{path}: image not found (see Dataset.md)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})") from None


def load_image(path, box=None, draft=None):
    """Decode ``path`` as an RGB PIL image, optionally cropped to ``box`` = (x1, y1, x2, y2) in pixels.

    ``draft`` = (w, h): a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that still leaves the
    image, or the box, at least that many pixels (other formats are decoded whole)."""
    with opened_image(path) as img:
        if draft is not None and img.format == "JPEG":
            box = _draft(img, box, draft)
        img = img.convert("RGB")
    if box is not None:
        img = img.crop(crop_box(box, *img.size))
    return img


class ImageListDataset(torch.utils.data.Dataset):
    """Images given by path, with optional labels and crop boxes; items are ``(image, label, index)``.

    ``image_input`` (advbct/data/decoding.py) says what a worker makes of an image file (a uint8 tensor,
    or the file's bytes for GPU decoding), how items are batched (:meth:`collate`) and how a batch becomes
    normalised model input on a device (:meth:`to_device`); without it items are RGB PIL images.
    ``label`` is -1 when no labels are given. Paths are kept in a numpy string array (no per-item Python
    objects, so forked DataLoader workers share the memory instead of copying it).
    """

    def __init__(self, paths, labels=None, image_input=None, boxes=None, root=None):
        self.paths = _join_root(root, np.asarray(paths, dtype=str).reshape(-1))
        n = len(self.paths)
        if labels is None:
            self.labels = np.full(n, -1, dtype=np.int64)
        else:
            self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(self.labels) != n:
                raise ValueError(f"{len(self.labels)} labels for {n} paths")
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if self.boxes is not None and len(self.boxes) != n:
            raise ValueError(f"{len(self.boxes)} boxes for {n} paths")
        self.image_input = image_input

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        box = None if self.boxes is None else tuple(self.boxes[index])
        path = str(self.paths[index])
        img = load_image(path, box) if self.image_input is None else self.image_input.read(path, box)
        return img, int(self.labels[index]), int(index)

    def collate(self, items):
        """DataLoader ``collate_fn``: a list of items -> (images, labels, indices)."""
        if self.image_input is None:
            return torch.utils.data.default_collate(items)
        return self.image_input.collate(items)

    def to_device(self, images, device, memory_format=torch.contiguous_format):
        """A collated image batch -> normalised float32 model input on ``device``."""
        return self.image_input.to_device(images, device, memory_format)
