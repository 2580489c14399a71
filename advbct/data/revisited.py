"""Revisited Oxford5k / Paris6k (Radenovic et al. CVPR 2018): image lists and ground truth.

Layout of the original repository (AdvBCT ``Dataset.md``)::

    ROOT/gnd_roxford5k.pkl        ROOT/roxford5k/jpg/<name>.jpg
    ROOT/gnd_rparis6k.pkl         ROOT/rparis6k/jpg/<name>.jpg

The revisitop download layout ``ROOT/roxford5k/gnd_roxford5k.pkl`` is accepted too. The gnd pickle holds
``imlist`` (gallery names), ``qimlist`` (query names) and ``gnd`` (per query ``easy``, ``hard``, ``junk``
gallery indices and the query box ``bbx`` = [x1, y1, x2, y2]). Queries are NOT part of the gallery.
"""

import os
from dataclasses import dataclass

import numpy as np

from advbct.data.files import missing_files
from advbct.data.image_list import ImageListDataset
from advbct.data.safe_pickle import safe_load_pickle
from advbct.errors import UserError

REVISITED_NAMES = ("roxford5k", "rparis6k")
GND_KEYS = ("easy", "hard", "junk")


@dataclass
class RevisitedDataset:
    """One revisited test set: query/gallery image paths, per-query ground truth and query boxes."""

    name: str
    gnd_path: str
    image_dir: str
    query_names: list
    gallery_names: list
    query_paths: list
    gallery_paths: list
    gnd: list  # per query: {"easy", "hard", "junk": int64 arrays of gallery indices, "bbx": float64 (4,)}
    query_bbx: np.ndarray  # (num_queries, 4) float64, [x1, y1, x2, y2]
    crop_query: bool = False

    def query_dataset(self, image_input=None):
        """Queries as an ImageListDataset, cropped to ``bbx`` only when ``crop_query`` (original: no crop)."""
        boxes = self.query_bbx if self.crop_query else None
        return ImageListDataset(self.query_paths, image_input=image_input, boxes=boxes)

    def gallery_dataset(self, image_input=None):
        """Gallery (database) images as an ImageListDataset."""
        return ImageListDataset(self.gallery_paths, image_input=image_input)


def find_gnd_file(root, name):
    """Path of ``gnd_<name>.pkl`` under ``root`` (original layout) or ``root/<name>/`` (revisitop layout)."""
    candidates = [os.path.join(root, f"gnd_{name}.pkl"), os.path.join(root, name, f"gnd_{name}.pkl")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"{candidates[0]}: ground-truth file not found (nor {candidates[1]}); see Dataset.md")


def _index_array(value, where, n_gallery):
    """Validate a list of gallery indices; return it (order kept) as an int64 array."""
    try:
        arr = np.asarray(value, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a list of integer gallery indices") from None
    if len(arr) and (arr.min() < 0 or arr.max() >= n_gallery):
        raise UserError(f"{where}: gallery index out of range [0, {n_gallery})")
    return arr


def _parse_gnd(cfg, gnd_path):
    """Check the structure of a loaded gnd dict; return (imlist, qimlist, gnd list with numpy arrays)."""
    if not isinstance(cfg, dict):
        raise UserError(f"{gnd_path}: expected a dict with keys imlist, qimlist, gnd")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise UserError(f"{gnd_path}: missing key '{key}' (expected imlist, qimlist, gnd)")
    imlist, qimlist, raw_gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    for key, value in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{gnd_path}: '{key}' must be a list of image names")
    if not isinstance(raw_gnd, (list, tuple)) or len(raw_gnd) != len(qimlist):
        raise UserError(f"{gnd_path}: 'gnd' must be a list with one entry per query ({len(qimlist)})")
    gnd = []
    for q, entry in enumerate(raw_gnd):
        where = f"{gnd_path}: gnd[{q}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a dict with keys easy, hard, junk, bbx")
        parsed = {}
        for key in GND_KEYS:
            if key not in entry:
                raise UserError(f"{where}: missing key '{key}'")
            parsed[key] = _index_array(entry[key], f"{where}['{key}']", len(imlist))
        if "bbx" not in entry:
            raise UserError(f"{where}: missing key 'bbx'")
        try:
            parsed["bbx"] = np.asarray(entry["bbx"], dtype=np.float64).reshape(4)
        except (TypeError, ValueError):
            raise UserError(f"{where}['bbx']: expected [x1, y1, x2, y2]") from None
        gnd.append(parsed)
    return list(imlist), list(qimlist), gnd


def _check_images(paths, image_dir):
    """Raise UserError naming the first missing image and how many are missing."""
    missing = missing_files(paths)
    if missing.any():
        first = paths[int(np.flatnonzero(missing)[0])]
        raise UserError(
            f"{first}: image not found ({int(missing.sum())} of {len(paths)} images missing under "
            f"{image_dir}); see Dataset.md"
        )


def load_revisited(root, name, crop_query=False, check_images=True):
    """Load ROxford5k (``name='roxford5k'``) or RParis6k (``'rparis6k'``) from ``root``.

    The image folder and all image paths are checked up front unless ``check_images`` is False (e.g. to
    read only the ground truth). ``crop_query`` crops query images to their ``bbx`` (the revisitop
    standard); the original AdvBCT code does not (default).
    """
    root = str(root)
    name = str(name).lower()
    if name not in REVISITED_NAMES:
        raise UserError(f"unknown revisited dataset '{name}' under {root} "
                        f"(expected one of {', '.join(REVISITED_NAMES)}; see Dataset.md)")
    if not os.path.isdir(root):
        raise UserError(f"{root}: dataset root not found (expected gnd_{name}.pkl and {name}/jpg/; see Dataset.md)")
    gnd_path = find_gnd_file(root, name)
    imlist, qimlist, gnd = _parse_gnd(safe_load_pickle(gnd_path), gnd_path)

    image_dir = os.path.join(root, name, "jpg")
    query_paths = [os.path.join(image_dir, f"{n}.jpg") for n in qimlist]
    gallery_paths = [os.path.join(image_dir, f"{n}.jpg") for n in imlist]
    if check_images:
        if not os.path.isdir(image_dir):
            raise UserError(f"{image_dir}: image folder not found (see Dataset.md)")
        _check_images(query_paths + gallery_paths, image_dir)
    query_bbx = np.stack([g["bbx"] for g in gnd]) if gnd else np.zeros((0, 4))
    return RevisitedDataset(
        name=name,
        gnd_path=gnd_path,
        image_dir=image_dir,
        query_names=qimlist,
        gallery_names=imlist,
        query_paths=query_paths,
        gallery_paths=gallery_paths,
        gnd=gnd,
        query_bbx=query_bbx,
        crop_query=bool(crop_query),
    )
