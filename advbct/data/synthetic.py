"""Procedural "landmark" benchmark, written to disk in the real formats of GLDv2, ROxford5k and RParis6k.

A landmark is a scene drawn from its own seed: ground, a main building (textured block with a roof,
dome or spire), towers, ornaments (rose windows, arches, bands) and side objects, in colours from a
palette shared by all landmarks (so colour alone does not identify one); the sky is drawn per image.
An image of a landmark is that scene under a perspective view change (zoom, rotation, shift, corner jitter), in front of a random
cluttered background, with distractor shapes, occluding patches, an illumination change (gain, contrast,
colour cast, gamma) and noise; a ``strength`` in [0, 1] scales every change. Revisited ground truth uses
it for its levels: easy = mild, hard = strong, junk = a zoomed-in fragment that is mostly occluded.
Train, test and distractor landmarks come from disjoint seeds. Every image has its own random stream
(seed, kind, landmark, image), so the output is byte-identical for a given seed.

Beside the three test formats it writes ``pretrain/``: labelled views of yet other landmarks, one folder
per class with an image list, the stand-in for ImageNet. The paper starts both old and new models from
one ImageNet backbone; the synthetic blocks pretrain one backbone here and start both from it, which is
what lets a compatibility learnt on the training classes carry over to unseen test landmarks.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from advbct.data.gldv2 import image_relpath, prepare_gldv2
from advbct.errors import UserError

FORMAT_VERSION = 2  # 2: adds pretrain/
MARKER = "SYNTHETIC.json"  # written last: its presence means a complete benchmark
PARTIAL_MARKER = "SYNTHETIC.partial"  # written first, removed at the end: an interrupted generation
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Preset:
    """Sizes of one synthetic benchmark (counts are per landmark where noted)."""

    image_size: int
    train_classes: int
    train_images: tuple  # (min, max) clean images per train landmark
    train_noise: float  # extra train.csv rows (wrong landmark) left out of train_clean.csv, as a fraction
    dropped_classes: int  # landmarks only in train.csv (removed by "cleaning")
    rev_landmarks: int
    rev_queries: int  # per landmark
    rev_easy: int  # gallery images per landmark and level
    rev_hard: int
    rev_junk: int
    rev_distractors: int  # gallery images of other, unseen landmarks
    gld_landmarks: int
    gld_queries: int  # per landmark
    gld_index: tuple  # (min, max) index images per landmark
    gld_distractors: int  # index images of other landmarks
    gld_ignored: int  # test images without landmark in the index (Usage Ignored)
    pretrain_classes: int  # landmarks of the pretraining corpus (pretrain/), disjoint from all others
    pretrain_images: tuple  # (min, max) images per pretraining landmark


PRESETS = {
    "tiny": Preset(
        image_size=64, train_classes=40, train_images=(8, 12), train_noise=0.05, dropped_classes=2,
        rev_landmarks=4, rev_queries=2, rev_easy=7, rev_hard=5, rev_junk=3, rev_distractors=90,
        gld_landmarks=10, gld_queries=2, gld_index=(6, 10), gld_distractors=120, gld_ignored=6,
        pretrain_classes=40, pretrain_images=(8, 12)),
    "small": Preset(
        # many small classes, like GLDv2's long tail (81 k classes): with 300 old classes the
        # old classifier pins the embedding space down well enough for compatibility to carry over to
        # unseen landmarks; 60 old classes of 12-18 images did not (docs/REPRODUCTION.md, 2026-11-26).
        # 5-7 images per class (trained 3 epochs) rather than 2-4 (6 epochs) make the data matter:
        # phi* gains 6-11 points over the old model. 70 revisited queries, as the real sets (2026-12-02).
        # 2,000 landmarks (600 old, ~12k images) rather than 1,000: a new ResNet-50 learns the map into the
        # old ResNet-18's space well enough for unseen landmarks only from that many (2026-12-03)
        image_size=64, train_classes=2000, train_images=(5, 7), train_noise=0.05, dropped_classes=5,
        rev_landmarks=14, rev_queries=5, rev_easy=20, rev_hard=15, rev_junk=10, rev_distractors=150,
        gld_landmarks=50, gld_queries=2, gld_index=(10, 14), gld_distractors=900, gld_ignored=20,
        pretrain_classes=200, pretrain_images=(12, 18)),
    "medium": Preset(
        image_size=96, train_classes=1000, train_images=(14, 26), train_noise=0.05, dropped_classes=20,
        rev_landmarks=14, rev_queries=5, rev_easy=40, rev_hard=30, rev_junk=20, rev_distractors=1740,
        gld_landmarks=200, gld_queries=2, gld_index=(12, 18), gld_distractors=5000, gld_ignored=100,
        pretrain_classes=1000, pretrain_images=(14, 26)),
}

# strength ranges of the image kinds; junk images are zoomed fragments (see render_view)
LEVELS = {
    "train": (0.1, 0.9),
    "query": (0.1, 0.3),
    "easy": (0.05, 0.35),
    "hard": (0.6, 0.95),
    "junk": (0.5, 0.9),
    "index": (0.05, 0.8),
    "other": (0.05, 0.9),
}

# seed domains: landmarks of different roles never share a scene seed
_KIND = {
    "gld_train": 1, "gld_dropped": 2, "gld_test": 3, "gld_distractor": 4, "gld_ignored": 5, "gld_noise": 6,
    "roxford5k": 7, "roxford5k_distractor": 8, "rparis6k": 9, "rparis6k_distractor": 10, "pretrain": 11,
}

# shared palette (stone, brick, slate, copper, gold, foliage, sky ...): colour is weak evidence of identity
PALETTE = np.array(
    [
        [222, 205, 170], [190, 160, 120], [150, 120, 95], [170, 80, 60], [120, 60, 50], [200, 200, 195],
        [140, 140, 145], [80, 85, 95], [60, 80, 120], [110, 150, 140], [70, 120, 80], [200, 170, 60],
        [240, 240, 235], [40, 40, 45], [150, 180, 210], [100, 130, 170], [180, 110, 140], [210, 130, 70],
    ],
    dtype=np.float32,
)


# sky colours (top, horizon) of the per-image sky: day, overcast, dusk, haze
SKIES = np.array(
    [[[90, 140, 210], [190, 215, 240]], [[150, 160, 170], [210, 210, 210]], [[70, 70, 120], [240, 160, 110]],
     [[170, 190, 205], [235, 230, 215]], [[40, 90, 170], [150, 190, 230]]],
    dtype=np.float32,
)


def _rng(seed, *keys):
    """Independent random stream for (seed, keys...)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def _colour(rng, jitter=18.0):
    return np.clip(PALETTE[rng.integers(len(PALETTE))] + rng.normal(0, jitter, 3), 0, 255)


# ------------------------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A rendered landmark: square RGBA canvas (alpha 0 where the sky goes) and the landmark's box
    (x1, y1, x2, y2) in canvas pixels."""

    pixels: np.ndarray
    box: tuple


def _texture(rng, xs, ys, size, c1, c2):
    """Colours (n, 3) at pixels (xs, ys) of a two-colour texture: flat, stripes, checker, windows, bricks
    or gradient (evaluated only where it is painted)."""
    xx, yy = xs.astype(np.float32), ys.astype(np.float32)
    kind = rng.integers(6)
    period = rng.uniform(0.04, 0.14) * size
    if kind == 0:
        t = np.zeros(len(xx), dtype=bool)
    elif kind == 1:
        angle = rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)])
        t = ((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 1.0 < rng.uniform(0.3, 0.6)
    elif kind == 2:
        t = ((xx // period + yy // period) % 2).astype(bool)
    elif kind == 3:  # window grid
        t = ((xx % period) < 0.55 * period) & ((yy % (1.4 * period)) < 0.7 * period)
    elif kind == 4:  # bricks: every other row shifted by half a brick
        row = yy // (0.5 * period)
        t = (((xx + (row % 2) * 0.5 * period) % period) < 0.12 * period) | ((yy % (0.5 * period)) < 0.12 * period)
    else:
        w = (yy if rng.random() < 0.5 else xx)[:, None] / size
        return c1[None] * (1 - w) + c2[None] * w
    return np.where(t[:, None], c2[None], c1[None])


class _MaskPen:
    """ImageDraw proxy whose shape methods fill with 255: ``pen.rectangle(box)`` draws into a mask."""

    def __init__(self, draw):
        self._draw = draw

    def __getattr__(self, name):
        method = getattr(self._draw, name)
        return lambda *args, **kwargs: method(*args, fill=255, **kwargs)


def _paint(canvas, rng, draw_fn, box_acc, c1=None, c2=None):
    """Draw a shape (``draw_fn(pen)`` on a mask) filled with a random texture onto ``canvas``; append the
    shape's pixel box to ``box_acc`` unless it is None."""
    size = canvas.shape[0]
    mask_img = Image.new("L", (size, size), 0)
    draw_fn(_MaskPen(ImageDraw.Draw(mask_img)))
    mask = np.asarray(mask_img) > 0
    if not mask.any():
        return
    c1 = _colour(rng) if c1 is None else c1
    c2 = _colour(rng) if c2 is None else c2
    ys, xs = np.nonzero(mask)
    canvas[ys, xs, :3] = _texture(rng, xs, ys, size, c1, c2)
    canvas[ys, xs, 3] = 255
    if box_acc is not None:
        box_acc.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def make_scene(rng, size):
    """Draw one landmark scene (ground, building with roof/towers/ornaments, side objects) as RGBA; the
    sky is left transparent (alpha 0) and drawn per image, so it carries no identity."""
    horizon = rng.uniform(0.62, 0.85) * size
    canvas = np.zeros((size, size, 4), dtype=np.float32)
    h = horizon
    _paint(canvas, rng, lambda d: d.rectangle([0, h, size, size]), None)  # ground
    boxes = []

    # main block, anchored on the horizon
    cx = rng.uniform(0.35, 0.65) * size
    bw, bh = rng.uniform(0.3, 0.62) * size, rng.uniform(0.16, 0.36) * size
    x1, x2, top = cx - bw / 2, cx + bw / 2, h - bh
    _paint(canvas, rng, lambda d: d.rectangle([x1, top, x2, h]), boxes)
    # roof / dome / spire / stepped top / flat
    roof = rng.integers(5)
    rh = rng.uniform(0.1, 0.3) * size
    if roof == 0:
        _paint(canvas, rng, lambda d: d.polygon([(x1 - 2, top), (x2 + 2, top), (cx, top - rh)]), boxes)
    elif roof == 1:
        dw = bw * rng.uniform(0.35, 0.8)
        _paint(canvas, rng, lambda d: d.pieslice([cx - dw / 2, top - rh, cx + dw / 2, top + rh], 180, 360), boxes)
    elif roof == 2:
        sw = bw * rng.uniform(0.08, 0.2)
        _paint(canvas, rng, lambda d: d.polygon([(cx - sw, top), (cx + sw, top), (cx, top - 1.8 * rh)]), boxes)
    elif roof == 3:
        for k in range(1, 3):
            f = 1 - 0.3 * k
            _paint(canvas, rng, lambda d, f=f, k=k: d.rectangle(
                [cx - bw * f / 2, top - k * rh / 2, cx + bw * f / 2, top - (k - 1) * rh / 2]), boxes)
    # towers: none, one, or a symmetric pair
    n_towers = rng.integers(3)
    tw, th = rng.uniform(0.06, 0.14) * size, rng.uniform(0.3, 0.55) * size
    offsets = {0: [], 1: [rng.uniform(-0.5, 0.5) * bw], 2: [-bw / 2, bw / 2]}[int(n_towers)]
    c_tower, c_tower2, cap = _colour(rng), _colour(rng), rng.integers(3)
    for off in offsets:
        tx = cx + off
        _paint(canvas, rng, lambda d, tx=tx: d.rectangle([tx - tw / 2, h - th, tx + tw / 2, h]), boxes,
               c_tower, c_tower2)
        if cap == 0:
            _paint(canvas, rng, lambda d, tx=tx: d.polygon(
                [(tx - tw / 2 - 1, h - th), (tx + tw / 2 + 1, h - th), (tx, h - th - 1.5 * tw)]), boxes)
        elif cap == 1:
            _paint(canvas, rng, lambda d, tx=tx: d.ellipse(
                [tx - tw / 2, h - th - tw / 2, tx + tw / 2, h - th + tw / 2]), boxes)
    # ornaments on the block: rose window, arched doors, a band
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(3)
        ox, oy = rng.uniform(x1 + 0.15 * bw, x2 - 0.15 * bw), rng.uniform(top + 0.2 * bh, h - 0.2 * bh)
        r = rng.uniform(0.04, 0.1) * size
        if kind == 0:
            _paint(canvas, rng, lambda d, ox=ox, oy=oy, r=r: d.ellipse([ox - r, oy - r, ox + r, oy + r]), None)
        elif kind == 1:
            def arch(d, ox=ox, r=r):  # arched door: half disc on a rectangle
                d.chord([ox - r, h - 3 * r, ox + r, h - r], 180, 360)
                d.rectangle([ox - r, h - 2 * r, ox + r, h])
            _paint(canvas, rng, arch, None)
        else:
            _paint(canvas, rng, lambda d, oy=oy, r=r: d.rectangle([x1, oy - r / 3, x2, oy + r / 3]), None)
    # side objects (trees, statues, kiosks) standing on the ground
    for _ in range(rng.integers(0, 3)):
        sx = rng.uniform(0.05, 0.95) * size
        sw_, sh_ = rng.uniform(0.05, 0.14) * size, rng.uniform(0.08, 0.25) * size
        if rng.random() < 0.5:
            _paint(canvas, rng, lambda d, sx=sx, sw_=sw_, sh_=sh_: d.ellipse([sx - sw_, h - sh_, sx + sw_, h]), boxes)
        else:
            _paint(canvas, rng, lambda d, sx=sx, sw_=sw_, sh_=sh_: d.polygon(
                [(sx - sw_ / 2, h), (sx + sw_ / 2, h), (sx + sw_ / 4, h - sh_), (sx - sw_ / 4, h - sh_)]), boxes)
    boxes = np.array(boxes, dtype=np.float64)
    box = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
    return Scene(np.clip(canvas, 0, 255).astype(np.uint8), tuple(float(v) for v in box))


def _sky(rng, size):
    """A vertical sky gradient (uint8 RGB, size x size) from one of :data:`SKIES`, jittered."""
    top, low = SKIES[rng.integers(len(SKIES))] + rng.normal(0, 12, (2, 3))
    w = np.linspace(0, 1, size, dtype=np.float32)[:, None, None] ** rng.uniform(0.5, 1.5)
    return np.clip(top * (1 - w) + low * w, 0, 255).astype(np.uint8).repeat(size, axis=1)


# -------------------------------------------------------------------------------------------- views


def _perspective_coeffs(out_pts, in_pts):
    """PIL PERSPECTIVE coefficients (a..h) mapping output pixel -> input pixel for 4 point pairs."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(out_pts, in_pts):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))


def _random_shape(draw, rng, size, scale):
    """A flat-coloured random rectangle, ellipse or triangle of about ``scale * size`` pixels."""
    x, y = rng.uniform(0, size, 2)
    w, h = rng.uniform(0.3, 1.0, 2) * scale * size
    colour = tuple(int(c) for c in _colour(rng, 30))
    kind = rng.integers(3)
    if kind == 0:
        draw.rectangle([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=colour)
    elif kind == 1:
        draw.ellipse([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=colour)
    else:
        draw.polygon([(x - w / 2, y + h / 2), (x + w / 2, y + h / 2), (x + rng.uniform(-w, w) / 2, y - h / 2)],
                     fill=colour)


def _background(rng, size):
    """A generic cluttered backdrop (sky plus random shapes) for the area outside the scene."""
    img = Image.fromarray(_sky(rng, size))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 7)):
        _random_shape(draw, rng, size, 0.35)
    return img


def render_view(scene, rng, strength, out_size, junk=False, query=False, frame=None):
    """Photograph ``scene``: returns (PIL RGB image of ``out_size``, landmark box in its pixels or None).

    ``strength`` in [0, 1] scales the view change, clutter, occlusion and illumination change. ``junk``:
    a 2.2-3.5x zoom on a random part of the landmark, heavily occluded. ``query``: the whole landmark in
    view (zoomed out a little) and its box returned, like a revisited query with its ``bbx``.
    ``frame`` = (w, h): a real-size photograph instead, the centre w x h of a view rendered square at
    ``out_size`` = max(w, h) without supersampling (at that size aliasing is below the JPEG's own loss).
    """
    src = scene.pixels.shape[0]
    work = out_size if frame else 2 * out_size  # render at twice the size and box-downsample, for anti-aliasing
    s = float(strength)
    bx1, by1, bx2, by2 = scene.box
    if junk:
        zoom = rng.uniform(2.2, 3.5)
        centre = np.array([rng.uniform(bx1, bx2), rng.uniform(by1, by2)])
    else:
        zoom = (rng.uniform(0.75, 0.9) if query else 1.0) * np.exp(rng.normal(0, 0.25 * s))
        # aim between the landmark's centre and the canvas centre, plus a random shift
        aim = (np.array([(bx1 + bx2) / 2, (by1 + by2) / 2]) + src / 2) / 2
        centre = aim + rng.normal(0, 0.1 * s * src, 2)
    half = src / 2 / zoom
    angle = np.deg2rad(rng.normal(0, 10 * s))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    quad = centre + (unit * half) @ rot.T + rng.normal(0, 0.1 * s * half, (4, 2))
    corners = np.array([[0, 0], [work, 0], [work, work], [0, work]], dtype=np.float64)
    coeffs = _perspective_coeffs(corners, quad)

    # scene over this image's sky, opaque; warping it leaves alpha 0 where the view leaves the canvas
    alpha = scene.pixels[..., 3:].astype(np.float32) / 255.0
    opaque = np.empty_like(scene.pixels)
    opaque[..., :3] = (scene.pixels[..., :3] * alpha + _sky(rng, src) * (1 - alpha) + 0.5).astype(np.uint8)
    opaque[..., 3] = 255
    warped = Image.fromarray(opaque, "RGBA").transform((work, work), Image.PERSPECTIVE, tuple(coeffs),
                                                         Image.BILINEAR)
    img = _background(rng, work)
    img.paste(warped, (0, 0), warped)

    draw = ImageDraw.Draw(img)
    for _ in range(rng.poisson(0.5 + 2.5 * s)):  # clutter: small distractor shapes
        _random_shape(draw, rng, work, 0.15)
    n_occ = rng.integers(2, 4) if junk else 0 if query else int(rng.random() < 0.15 + 0.6 * s)
    for _ in range(n_occ):  # occluders: large flat-coloured patches
        area = rng.uniform(0.25, 0.45) if junk else rng.uniform(0.04, 0.08 + 0.22 * s)
        side = np.sqrt(area) * work * np.exp(rng.normal(0, 0.3, 2))
        x, y = rng.uniform(0, work - side[0] / 2), rng.uniform(0, work - side[1] / 2)
        colour = tuple(int(c) for c in _colour(rng, 30))
        (draw.rectangle if rng.random() < 0.6 else draw.ellipse)([x, y, x + side[0], y + side[1]], fill=colour)

    # illumination (at output size): gamma, gain, per-channel colour cast, contrast around mid-grey, noise
    arr = np.asarray(img.resize((out_size, out_size), Image.BOX), dtype=np.float32) / 255.0
    arr = arr ** np.exp(rng.normal(0, 0.2 * s))
    arr = arr * np.exp(rng.normal(0, 0.25 * s)) * np.exp(rng.normal(0, 0.12 * s, 3))
    arr = (arr - 0.5) * np.exp(rng.normal(0, 0.25 * s)) + 0.5
    arr = arr + rng.normal(0, (2 + 6 * s) / 255.0, arr.shape).astype(np.float32)
    out = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
    dx, dy = 0, 0
    if frame:
        dx, dy = (out_size - frame[0]) // 2, (out_size - frame[1]) // 2
        out = out.crop((dx, dy, dx + frame[0], dy + frame[1]))

    if not query:
        return out, None
    # landmark box: scene box corners mapped scene -> output with the inverse homography, then clipped
    a, b, c, d, e, f, g, h = coeffs
    inv = np.linalg.inv(np.array([[a, b, c], [d, e, f], [g, h, 1.0]]))
    pts = np.array([[bx1, by1, 1], [bx2, by1, 1], [bx2, by2, 1], [bx1, by2, 1]]) @ inv.T
    pts = pts[:, :2] / pts[:, 2:3] * (out_size / work)
    lo, hi = pts.min(axis=0).clip(0, out_size), pts.max(axis=0).clip(0, out_size)
    if frame:
        lo, hi = (lo - (dx, dy)).clip(0, frame), (hi - (dx, dy)).clip(0, frame)
    return out, (lo[0], lo[1], hi[0], hi[1])


def _strength(rng, level):
    lo, hi = LEVELS[level]
    return rng.uniform(lo, hi)


# ------------------------------------------------------------------------------------------ writing


def _save_jpeg(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    with open(path, "wb") as handle:
        handle.write(buf.getvalue())


def _image_id(seed, *keys):
    """A GLDv2-style 16-hex-digit image id, deterministic in (seed, keys)."""
    return hashlib.blake2b(":".join(map(str, (seed, *keys))).encode(), digest_size=8).hexdigest()


class _World:
    """Scenes and images of one generation (seed, preset)."""

    def __init__(self, seed, preset, frame=None):
        self.seed, self.preset, self.frame = int(seed), preset, frame
        self.size = max(frame) if frame else preset.image_size  # the square a view is rendered at
        self.canvas = max(frame) if frame else 2 * preset.image_size

    def scene(self, kind, landmark):
        return make_scene(_rng(self.seed, _KIND[kind], landmark), self.canvas)

    def render(self, scene, rng, strength, level=None):
        return render_view(scene, rng, strength, self.size, junk=(level == "junk"), query=(level == "query"),
                           frame=self.frame)

    def view(self, scene, kind, landmark, image, level):
        rng = _rng(self.seed, 100 + _KIND[kind], landmark, image)
        return self.render(scene, rng, _strength(rng, level), level)


def _write_revisited(world, root, name, hard_range):
    """Write ``gnd_<name>.pkl`` and ``<name>/jpg`` like the revisitop files; returns counts."""
    p, seed = world.preset, world.seed
    jpg = os.path.join(root, name, "jpg")
    prefix = {"roxford5k": "oxford", "rparis6k": "paris"}[name]
    rng = _rng(seed, 1000 + _KIND[name])
    qimlist, query_boxes, gallery = [], [], []  # gallery: (name, landmark or -1, level)
    for lm in range(p.rev_landmarks):
        scene = world.scene(name, lm)
        for q in range(p.rev_queries):
            qname = f"{prefix}_lm{lm:02d}_q{q:03d}"
            img, box = world.view(scene, name, lm, 10_000 + q, "query")
            _save_jpeg(img, os.path.join(jpg, qname + ".jpg"))
            qimlist.append(qname)
            query_boxes.append([round(float(v), 1) for v in box])
        counts = {"easy": p.rev_easy, "hard": p.rev_hard, "junk": p.rev_junk}
        k = 0
        for level, n in counts.items():
            for _ in range(n):
                gname = f"{prefix}_lm{lm:02d}_{k:06d}"
                if level == "hard":  # per-dataset hard range (ROxford's hard set is the harsher one)
                    irng = _rng(seed, 100 + _KIND[name], lm, k)
                    img, _ = world.render(scene, irng, irng.uniform(*hard_range))
                else:
                    img, _ = world.view(scene, name, lm, k, level)
                _save_jpeg(img, os.path.join(jpg, gname + ".jpg"))
                gallery.append((gname, lm, level))
                k += 1
    dkind = f"{name}_distractor"
    for i in range(p.rev_distractors):
        lm = i // 3  # three views of each distractor landmark
        if i % 3 == 0:
            scene = world.scene(dkind, lm)
        gname = f"{prefix}_general_{i:06d}"
        img, _ = world.view(scene, dkind, lm, i, "other")
        _save_jpeg(img, os.path.join(jpg, gname + ".jpg"))
        gallery.append((gname, -1, "other"))

    order = rng.permutation(len(gallery))
    gallery = [gallery[i] for i in order]
    imlist = [g[0] for g in gallery]
    gnd = []
    for q, qname in enumerate(qimlist):
        lm = q // p.rev_queries
        entry = {"bbx": query_boxes[q]}
        for level in ("easy", "hard", "junk"):
            entry[level] = [i for i, g in enumerate(gallery) if g[1] == lm and g[2] == level]
        gnd.append(entry)
    with open(os.path.join(root, f"gnd_{name}.pkl"), "wb") as handle:
        # same structure, key order, Python types and protocol as the revisitop files
        pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, handle, protocol=3)
    return {"queries": len(qimlist), "gallery": len(imlist)}


def _write_gldv2_images(world, root):
    """Write GLDv2-layout images and the official CSVs; returns counts."""
    p, seed = world.preset, world.seed
    rng = _rng(seed, 2000)
    landmark_ids = np.sort(rng.choice(20 * (p.train_classes + p.dropped_classes),
                                      p.train_classes + p.dropped_classes, replace=False))
    lm_order = rng.permutation(len(landmark_ids))
    clean_lm, dropped_lm = landmark_ids[np.sort(lm_order[: p.train_classes])], landmark_ids[np.sort(lm_order[p.train_classes:])]

    def save(folder, image_id, img):
        _save_jpeg(img, os.path.join(root, image_relpath(folder, image_id)))

    train_rows, clean = [], {}  # train.csv rows (id, landmark_id); clean: landmark -> ids
    for k, lm in enumerate(clean_lm.tolist()):
        scene = world.scene("gld_train", k)
        n = int(_rng(seed, 2001, k).integers(p.train_images[0], p.train_images[1] + 1))
        ids = []
        for i in range(n):
            image_id = _image_id(seed, "train", k, i)
            save("train", image_id, world.view(scene, "gld_train", k, i, "train")[0])
            ids.append(image_id)
            train_rows.append((image_id, lm))
        clean[lm] = [ids[j] for j in _rng(seed, 2002, k).permutation(n)]
    for k, lm in enumerate(dropped_lm.tolist()):
        scene = world.scene("gld_dropped", k)
        for i in range(3):
            image_id = _image_id(seed, "dropped", k, i)
            save("train", image_id, world.view(scene, "gld_dropped", k, i, "train")[0])
            train_rows.append((image_id, lm))
    n_noise = int(round(p.train_noise * len(train_rows)))
    for i in range(n_noise):  # mislabelled images: another scene filed under a clean landmark
        image_id = _image_id(seed, "noise", i)
        save("train", image_id, world.view(world.scene("gld_noise", i), "gld_noise", i, 0, "train")[0])
        train_rows.append((image_id, int(clean_lm[_rng(seed, 2003, i).integers(len(clean_lm))])))
    train_rows = [train_rows[i] for i in rng.permutation(len(train_rows))]

    index, queries = [], []  # index: (id, landmark or -1); queries: (id, landmark or -1)
    for k in range(p.gld_landmarks):
        scene = world.scene("gld_test", k)
        for q in range(p.gld_queries):
            image_id = _image_id(seed, "test", k, q)
            save("test", image_id, world.view(scene, "gld_test", k, 10_000 + q, "query")[0])
            queries.append((image_id, k))
        n = int(_rng(seed, 2004, k).integers(p.gld_index[0], p.gld_index[1] + 1))
        for i in range(n):
            image_id = _image_id(seed, "index", k, i)
            save("index", image_id, world.view(scene, "gld_test", k, i, "index")[0])
            index.append((image_id, k))
    for i in range(p.gld_distractors):
        lm = i // 3
        if i % 3 == 0:
            scene = world.scene("gld_distractor", lm)
        image_id = _image_id(seed, "index_distractor", i)
        save("index", image_id, world.view(scene, "gld_distractor", lm, i, "other")[0])
        index.append((image_id, -1))
    for i in range(p.gld_ignored):
        image_id = _image_id(seed, "test_ignored", i)
        scene = world.scene("gld_ignored", i)
        save("test", image_id, world.view(scene, "gld_ignored", i, 0, "other")[0])
        queries.append((image_id, -1))
    index = [index[i] for i in rng.permutation(len(index))]
    queries = [queries[i] for i in rng.permutation(len(queries))]
    private = {k for k in range(p.gld_landmarks) if _rng(seed, 2005, k).random() < 0.6}

    def write(name, header, rows):
        with open(os.path.join(root, name), "w", encoding="utf-8", newline="\n") as handle:
            handle.write(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))

    write("train.csv", "id,url,landmark_id",
          [(i, f"https://synthetic.invalid/train/{i}.jpg", lm) for i, lm in train_rows])
    write("train_clean.csv", "landmark_id,images", [(lm, " ".join(clean[lm])) for lm in sorted(clean)])
    write("index.csv", "id", [(i,) for i, _ in index])
    write("test.csv", "id", [(i,) for i, _ in queries])
    solution = []
    for image_id, k in queries:
        if k < 0:
            solution.append((image_id, "None", "Ignored"))
        else:
            relevant = " ".join(i for i, lm in index if lm == k)
            solution.append((image_id, relevant, "Private" if k in private else "Public"))
    write("retrieval_solution_v2.1.csv", "id,images,Usage", solution)
    return {"train_csv_rows": len(train_rows), "index": len(index), "test": len(queries)}


def _write_pretrain(world, root):
    """Write the pretraining corpus: ``train/<class>/<id>.jpg`` and ``train_list.txt`` (``path label``
    lines, the format of :mod:`advbct.data.image_list`); returns counts and the list's name."""
    p, seed = world.preset, world.seed
    lines = []
    for k in range(p.pretrain_classes):
        scene = world.scene("pretrain", k)
        n = int(_rng(seed, 3001, k).integers(p.pretrain_images[0], p.pretrain_images[1] + 1))
        for i in range(n):
            rel = f"train/{k:05d}/{_image_id(seed, 'pretrain', k, i)}.jpg"
            _save_jpeg(world.view(scene, "pretrain", k, i, "train")[0], os.path.join(root, rel))
            lines.append(f"{rel} {k}\n")
    with open(os.path.join(root, "train_list.txt"), "w", encoding="utf-8", newline="\n") as handle:
        handle.write("".join(lines))
    return {"classes": p.pretrain_classes, "images": len(lines), "train_list": "pretrain/train_list.txt"}


def _prepare_out(out, overwrite):
    """Create ``out``; replace an earlier benchmark of ours only with ``overwrite`` (an interrupted one
    always), and never anything that this generator did not write."""
    targets = [os.path.join(out, name) for name in ("gldv2", "ROxfordParis", "pretrain")]
    marker, partial = os.path.join(out, MARKER), os.path.join(out, PARTIAL_MARKER)
    present = [t for t in targets if os.path.exists(t)]
    if present:
        ours = os.path.isfile(marker) or os.path.isfile(partial)
        if not ours:
            raise UserError(f"{present[0]}: exists but {marker} does not: not a synthetic benchmark, not overwriting")
        if os.path.isfile(marker) and not overwrite:
            raise UserError(f"{present[0]}: already exists; pass --overwrite or choose an empty --out")
        for t in present:
            shutil.rmtree(t)
    if os.path.isfile(marker):
        os.remove(marker)
    os.makedirs(out, exist_ok=True)


def write_photos(out, frame, count, seed=0):
    """``count`` real-size (``frame`` = (w, h)) JPEG photographs of distinct landmarks, as the benchmark
    writes them, in ``out``; returns their paths. For measuring decoders without a whole benchmark."""
    world, paths = _World(seed, PRESETS["tiny"], tuple(frame)), []
    for i in range(count):
        if i % 4 == 0:  # four views per landmark
            scene = world.scene("gld_distractor", i // 4)
        path = os.path.join(str(out), f"photo_{frame[0]}x{frame[1]}_{i:05d}.jpg")
        _save_jpeg(world.view(scene, "gld_distractor", i // 4, i, "other")[0], path)
        paths.append(path)
    return paths


def parse_frame(text):
    """``'1024x768'`` -> (1024, 768); a UserError naming ``--image-size`` otherwise."""
    w, _, h = str(text).lower().partition("x")
    if not (w.isdigit() and h.isdigit() and 16 <= int(w) <= 8192 and 16 <= int(h) <= 8192):
        raise UserError(f"--image-size '{text}': expected WIDTHxHEIGHT in pixels, 16 to 8192 each (e.g. 1024x768)")
    return int(w), int(h)


def make_synthetic(out, preset="tiny", seed=0, overwrite=False, frame=None):
    """Generate the benchmark under ``out`` (``gldv2/``, ``ROxfordParis/``, ``pretrain/``) and prepare the
    GLDv2 lists.

    ``frame`` = (w, h): every image a real-size w x h photograph (e.g. 1024 x 768, as ROxford's) instead of
    the preset's small squares; for measuring input pipelines, at the cost of minutes of rendering.
    Same (preset, seed, frame) -> byte-identical files. Returns the summary, also written to
    ``out/SYNTHETIC.json`` once everything is on disk.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown synthetic preset '{preset}' (expected one of {', '.join(PRESETS)})")
    out = str(out)
    p = PRESETS[preset]
    _prepare_out(out, overwrite)
    summary = {"format_version": FORMAT_VERSION, "preset": preset, "seed": int(seed), "params": asdict(p)}
    if frame:
        summary["image_size"] = list(frame)
    _write_json(os.path.join(out, PARTIAL_MARKER), summary)

    world = _World(seed, p, tuple(frame) if frame else None)
    rev_root = os.path.join(out, "ROxfordParis")
    summary["roxford5k"] = _write_revisited(world, rev_root, "roxford5k", (0.7, 1.0))
    summary["rparis6k"] = _write_revisited(world, rev_root, "rparis6k", (0.55, 0.9))
    gld_root = os.path.join(out, "gldv2")
    os.makedirs(gld_root, exist_ok=True)
    summary["gldv2"] = _write_gldv2_images(world, gld_root)
    prepared = prepare_gldv2(gld_root, gld_root, image_root=gld_root)
    prepared["train_list"] = os.path.relpath(prepared["train_list"], out)
    summary["gldv2"].update(prepared)
    summary["pretrain"] = _write_pretrain(world, os.path.join(out, "pretrain"))
    _write_json(os.path.join(out, MARKER), summary)
    os.remove(os.path.join(out, PARTIAL_MARKER))
    return summary


def read_summary(out):
    """The summary of the complete benchmark under ``out``; a missing one, or one written by another
    format version (older benchmarks lack ``pretrain/``), of an unknown preset or with other parameters than
    its preset's here, is a UserError saying how to regenerate."""
    path = os.path.join(str(out), MARKER)
    try:
        with open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{path} not found: generate the benchmark with tools/make_synthetic.py --out {out}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable synthetic benchmark summary ({exc})") from None
    fields = summary if isinstance(summary, dict) else {}
    version, preset = fields.get("format_version"), fields.get("preset")
    redo = (f"regenerate with tools/make_synthetic.py --out {out} "
            f"--preset {preset if preset in PRESETS else 'PRESET'} --overwrite")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format version {version}, this code needs {FORMAT_VERSION} (with pretrain/): {redo}")
    if preset not in PRESETS:
        raise UserError(f"{path}: preset {preset!r} is not one of this code's ({', '.join(PRESETS)}): {redo}")
    # a retuned preset makes older benchmarks of its name incomparable (JSON holds the tuples as lists)
    if fields.get("params") != json.loads(json.dumps(asdict(PRESETS[preset]))):
        raise UserError(f"{path}: generated with other parameters than this code's preset '{preset}': {redo}")
    return summary


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")
