"""Old-class meta: per-class centers and outlier-filtered radii of the frozen old model's embeddings.

PAPER.md "Old-class meta": f̂ = L2-normalised old embedding; c_k = mean f̂ of class k (not
re-normalised); radii r = ‖f̂ − c_k‖ sorted; with ≥ 4 samples keep r ∈ [q1 − 1.5·IQR, q3 + 1.5·IQR]
where q1 = r[⌊n/4⌋], q3 = r[⌊3n/4⌋]; r_max / r_min are the largest / smallest kept radius. LCE uses
the same rule on angles θ = arccos⟨f̂, c_k/‖c_k‖⟩. Everything is vectorised (no loop over classes).

Note: the IQR interval always contains r[⌊n/4⌋..⌊3n/4⌋] (≥ 3 values when n ≥ 4), so a class keeps
≤ 1 radius exactly when it has ≤ 1 sample; the same holds for the angles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from advbct.errors import UserError
from advbct.io import atomic_open

META_FORMAT = "advbct-class-meta-v1"
_TENSOR_KEYS = ("centers", "r_max", "r_min", "counts", "n_kept", "theta_max")


@dataclass
class ClassMeta:
    """Per-class statistics of the old model (row k = class k; classes without samples are zero)."""

    centers: torch.Tensor  # (C, D) float32, mean of normalised features, not re-normalised
    r_max: torch.Tensor  # (C,) float32, largest kept radius
    r_min: torch.Tensor  # (C,) float32, smallest kept radius
    counts: torch.Tensor  # (C,) int64, samples of the class
    n_kept: torch.Tensor  # (C,) int64, radii kept by the 1.5·IQR rule
    theta_max: torch.Tensor  # (C,) float32, largest kept angle (radians); NaN if unknown

    @property
    def num_classes(self) -> int:
        return int(self.centers.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.centers.shape[1])

    def to(self, device) -> "ClassMeta":
        return ClassMeta(**{k: getattr(self, k).to(device) for k in _TENSOR_KEYS})

    def state(self) -> dict:
        return {k: getattr(self, k) for k in _TENSOR_KEYS}


# ----------------------------------------------------------------------------------------- compute
def iqr_filter(values: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class 1.5·IQR filter of ``values`` (N,) grouped by ``labels`` (N,), vectorised.

    Returns (max kept, min kept, number kept), each (num_classes,); classes without values get
    (0, 0, 0). Sorting by (label, value) with two stable sorts puts each class in a contiguous,
    ascending segment starting at ``offsets[k]``.
    """
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    zeros = values.new_zeros(num_classes)
    if values.numel() == 0:
        return zeros, zeros.clone(), counts
    order = torch.sort(values, stable=True).indices
    order = order[torch.sort(labels[order], stable=True).indices]
    v, y = values[order], labels[order]
    offsets = torch.cumsum(counts, 0) - counts
    last = values.numel() - 1  # empty classes index anywhere valid; their rows are unused
    # q1 = r[⌊n/4⌋], q3 = r[⌊3n/4⌋] inside each sorted segment (0-based, as the original code)
    q1 = v[(offsets + torch.div(counts, 4, rounding_mode="floor")).clamp(max=last)]
    q3 = v[(offsets + torch.div(3 * counts, 4, rounding_mode="floor")).clamp(max=last)]
    iqr = q3 - q1
    lo, hi = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    keep = (counts[y] < 4) | ((v >= lo[y]) & (v <= hi[y]))  # fewer than 4 values: keep all
    n_kept = torch.zeros_like(counts).index_add_(0, y, keep.long())
    big, small = torch.finfo(v.dtype).max, torch.finfo(v.dtype).min
    r_max = torch.full_like(zeros, small).scatter_reduce_(0, y, torch.where(keep, v, small), "amax")
    r_min = torch.full_like(zeros, big).scatter_reduce_(0, y, torch.where(keep, v, big), "amin")
    empty = n_kept == 0
    r_max = r_max.masked_fill(empty, 0.0)
    r_min = r_min.masked_fill(empty, 0.0)
    return r_max, r_min, n_kept


def _refuse_non_finite(finite, labels, source) -> None:
    """UserError naming the classes of the rows ``finite`` marks False (NaN/inf features), if any: a NaN
    center would reach the compatibility loss of every batch of that class."""
    if bool(finite.all()):
        return
    classes = torch.unique(labels[~finite]).tolist()
    shown = ", ".join(str(c) for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
    raise UserError(f"{source}: NaN or inf features for {int((~finite).sum())} image(s) of {len(classes)} "
                    f"class(es) (ids {shown}); no class meta written")


def compute_meta(features, labels, num_classes: int, chunk_size: int = 262144, source="features") -> ClassMeta:
    """Class meta of old-model ``features`` (N, D) with integer ``labels`` (N,) in [0, num_classes).

    Runs on the features' device in chunks of ``chunk_size`` rows (1.58 M × 256 fits in a few GB).
    Radii/angles are computed in float32 like the original, the IQR rule in float64. NaN/inf features
    are refused (UserError naming ``source`` and the classes).
    """
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise UserError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}: expected (N, D) and (N,)")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    n, dim = features.shape
    device = features.device
    labels = labels.to(device)
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    finite = torch.empty(n, dtype=torch.bool, device=device)
    for s in range(0, n, chunk_size):
        chunk = features[s:s + chunk_size]
        finite[s:s + chunk_size] = torch.isfinite(chunk).all(dim=1)  # checked in the same pass as the sums
        f = torch.nn.functional.normalize(chunk.float(), dim=1)
        sums.index_add_(0, labels[s:s + chunk_size], f.double())
    _refuse_non_finite(finite, labels, source)
    centers = (sums / counts.clamp(min=1).unsqueeze(1)).float()
    unit_centers = torch.nn.functional.normalize(centers, dim=1)
    radii = torch.empty(n, dtype=torch.float32, device=device)
    angles = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, chunk_size):
        f = torch.nn.functional.normalize(features[s:s + chunk_size].float(), dim=1)
        y = labels[s:s + chunk_size]
        radii[s:s + chunk_size] = torch.linalg.vector_norm(f - centers[y], dim=1)
        u = unit_centers[y]
        cos = (f * u).sum(1, keepdim=True)
        # θ = arccos⟨f̂, ĉ⟩ (original), as atan2(|perpendicular part|, cos): accurate near θ = 0
        # where float32 arccos is off by ~3e-4, and π/2 for a zero center like arccos(0)
        sin = torch.linalg.vector_norm(f - cos * u, dim=1)
        angles[s:s + chunk_size] = torch.atan2(sin, cos.squeeze(1))
    r_max, r_min, n_kept = iqr_filter(radii.double(), labels, num_classes)
    theta_max, _, _ = iqr_filter(angles.double(), labels, num_classes)
    return ClassMeta(
        centers=centers.cpu(), r_max=r_max.float().cpu(), r_min=r_min.float().cpu(),
        counts=counts.cpu(), n_kept=n_kept.cpu(), theta_max=theta_max.float().cpu(),
    )


# ------------------------------------------------------------------------------------- save / load
def save_meta(path, meta: ClassMeta) -> None:
    """Write ``meta`` atomically as one ``.pt`` file of plain tensors (loadable with weights_only)."""
    payload = {"format": META_FORMAT, **{k: v.detach().cpu().contiguous() for k, v in meta.state().items()}}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def load_meta(path, device="cpu") -> ClassMeta:
    """Read a meta file written by :func:`save_meta` (or an original-release ``.json``) onto ``device``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class meta file {path} not found: expected the output of scripts/extract_meta.sh "
                        "(COMP_LOSS.META_PATH)")
    if path.suffix == ".json":
        return import_original_json(path).to(device)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch archive, pickled objects, ...
        raise UserError(f"class meta file {path} is not a readable advbct meta file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != META_FORMAT:
        raise UserError(f"class meta file {path}: expected a dict with format '{META_FORMAT}' "
                        "(written by scripts/extract_meta.sh)")
    missing = [k for k in _TENSOR_KEYS if not isinstance(payload.get(k), torch.Tensor)]
    if missing:
        raise UserError(f"class meta file {path} lacks tensor(s) {', '.join(missing)}")
    meta = ClassMeta(**{k: payload[k] for k in _TENSOR_KEYS})
    c = meta.centers.shape[0]
    if meta.centers.ndim != 2 or any(getattr(meta, k).shape != (c,) for k in _TENSOR_KEYS[1:]):
        raise UserError(f"class meta file {path}: inconsistent shapes (centers {tuple(meta.centers.shape)})")
    return meta.to(device)


# ---------------------------------------------------------------------- original release JSON format
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"meta JSON {path} not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"meta JSON {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"meta JSON {path}: expected an object "
                        '{"<class>": {"center": [...], "radius": [...]}}')
    return data


def _parse_json_classes(path: Path, data: dict):
    try:
        ids = [int(k) for k in data]
        centers = [data[k]["center"] for k in data]
        radii = [data[k]["radius"] for k in data]
        if not all(isinstance(r, list) for r in radii) or not all(isinstance(c, list) for c in centers):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"meta JSON {path}: expected integer class keys each with 'center' and 'radius' "
                        "lists") from None
    return ids, centers, radii


def import_original_json(path, theta_path=None, num_classes: int | None = None) -> ClassMeta:
    """Read the original release's meta JSON ``{"<class>": {"center": [...], "radius": [sorted kept radii]}}``.

    The JSON holds only kept radii, so r_max = last, r_min = first, n_kept = len and counts = n_kept
    (the total count is not stored). ``theta_path`` is the companion angle file (same format) for
    LCE; without it theta_max is NaN. Classes absent from the file are zero rows.
    """
    path = Path(path)
    ids, centers, radii = _parse_json_classes(path, _read_json(path))
    if not ids:
        raise UserError(f"meta JSON {path} holds no class")
    c = num_classes if num_classes is not None else max(ids) + 1
    if min(ids) < 0 or max(ids) >= c:
        raise UserError(f"meta JSON {path}: class ids must lie in [0, {c})")
    dim = len(centers[0])
    idx = torch.tensor(ids, dtype=torch.long)
    try:
        cen = torch.tensor(centers, dtype=torch.float32)
    except (ValueError, TypeError):
        raise UserError(f"meta JSON {path}: every 'center' must be a list of {dim} numbers") from None
    lengths = torch.tensor([len(r) for r in radii], dtype=torch.long)
    first = torch.tensor([float(r[0]) if r else 0.0 for r in radii], dtype=torch.float32)
    last = torch.tensor([float(r[-1]) if r else 0.0 for r in radii], dtype=torch.float32)
    meta = ClassMeta(
        centers=torch.zeros(c, dim).index_copy_(0, idx, cen),
        r_max=torch.zeros(c).index_copy_(0, idx, last),
        r_min=torch.zeros(c).index_copy_(0, idx, first),
        counts=torch.zeros(c, dtype=torch.long).index_copy_(0, idx, lengths),
        n_kept=torch.zeros(c, dtype=torch.long).index_copy_(0, idx, lengths),
        theta_max=torch.full((c,), float("nan")),
    )
    if theta_path is not None:
        tpath = Path(theta_path)
        tids, _, tradii = _parse_json_classes(tpath, _read_json(tpath))
        if tids and (min(tids) < 0 or max(tids) >= c):
            raise UserError(f"meta JSON {tpath}: class ids must lie in [0, {c})")
        tlast = torch.tensor([float(r[-1]) if r else 0.0 for r in tradii], dtype=torch.float32)
        meta.theta_max = torch.zeros(c).index_copy_(0, torch.tensor(tids, dtype=torch.long), tlast)
    return meta


def export_original_json(meta: ClassMeta, path) -> None:
    """Write ``meta`` in the original release's radius JSON format (classes with samples only).

    ClassMeta stores only r_min, r_max and n_kept, which is all the original code reads
    (``radius[0]``, ``radius[-1]``, ``len(radius)``); the interior of each list is written as an
    evenly spaced ramp from r_min to r_max, not the measured radii.
    """
    present = torch.nonzero(meta.n_kept > 0).flatten().tolist()
    centers = meta.centers.detach().cpu()
    data = {}
    for k in present:  # serialisation only: one JSON entry per class
        n = int(meta.n_kept[k])
        ramp = torch.linspace(float(meta.r_min[k]), float(meta.r_max[k]), n) if n > 1 else meta.r_max[k:k + 1]
        ramp = ramp.tolist()
        ramp[0], ramp[-1] = float(meta.r_min[k]), float(meta.r_max[k])
        data[str(k)] = {"center": centers[k].tolist(), "radius": ramp}
    with atomic_open(path) as handle:
        handle.write(json.dumps(data))
