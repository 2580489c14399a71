"""Benchmark: image input per core for each DATA.DECODE mode and a pre-resized copy, with what each costs.

For every benchmark root given (its test galleries sampled; e.g. one written by
``tools/make_synthetic.py --image-size 1024x768``), or real-size synthetic photographs of each size given to
``--generate`` (advbct.data.synthetic.write_photos), on one core (one process, one torch thread), the same
images through each way of making a ``--size`` model input from a file:

- ``pil``: the release's full decode and resize (the reference);
- ``pil_draft``: PIL's JPEG DCT-domain downscale first;
- ``nvjpeg (CPU decoder)``: the nvjpeg path's arithmetic (batched decode, crop, antialiased resize) with
  torchvision's CPU decoder: its fidelity here, the GPU's own decoder with CUDA (``nvjpeg``, then also its
  GPU throughput and the workers' per-core cost of reading bytes);
- ``preresized``: ``pil`` on a copy pre-resized to a short side of ``--short-side`` by
  ``tools/preresize.py`` (made once, on one core: its rate is reported as ``preresize_img_s_per_core``);
- ``nvjpeg_read``: what nvjpeg's DataLoader workers do per image (read the bytes, parse the header, draw
  the crop and flip), no pixel decoded.

Per mode: images/s per core (median of ``--repeats`` passes), the ratio to ``pil`` in the same run, and
the fidelity against ``pil``: mean absolute difference of the uint8 model inputs (0-255 scale), and, with
``--weights``, the mean and minimum cosine between embeddings of the same images by that trained model.

    python tools/benchmark.py loader --generate 1024x768,640x480 --pink --weights output/demo/old/final.pth \\
        [--data ROOT ...] [--size 224] [--images 128] [--json OUT.json]
"""

import os
import statistics
import tempfile

import numpy as np
import torch
from PIL import Image

from advbct.data.decoding import ImageInput, decode_on_device
from advbct.data.preresize import preresize
from advbct.data.synthetic import parse_frame, write_photos
from advbct.data.transforms import normalise
from advbct.errors import UserError
from advbct.evaluation import test_sets
from benchmarks.timing import timed_calls

MODES = ("pil", "pil_draft", "nvjpeg_cpu", "preresized")


def add_arguments(parser):
    """Options of this benchmark."""
    parser.add_argument("--data", nargs="+", default=[],
                        help="benchmark roots (tools/make_synthetic.py --image-size WxH), their galleries sampled")
    parser.add_argument("--generate", default="",
                        help="comma-separated WxH: --images synthetic photographs of each size, in a temporary folder")
    parser.add_argument("--pink", action="store_true",
                        help="also --images colour 1/f (pink) noise JPEGs of each --generate size: natural images' "
                             "spectrum with more detail than photographs have, so a lower bound on the rates")
    parser.add_argument("--images", type=int, default=128, help="images per folder (default 128)")
    parser.add_argument("--size", type=int, default=224, help="model input size (default 224, the release's)")
    parser.add_argument("--short-side", type=int, default=256, help="short side of the pre-resized copy (256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode; the median is kept (3)")
    parser.add_argument("--weights", default="", help="trained checkpoint for the embedding cosines")
    parser.add_argument("--arch", default="resnet18", help="its MODEL.ARCH (default resnet18)")
    parser.add_argument("--batch", type=int, default=32, help="images per decode batch of the nvjpeg path (32)")
    return parser


def gallery_images(root, n):
    """``n`` gallery images spread evenly over the galleries of every test set under the benchmark ``root``."""
    paths = []
    for spec in test_sets.specs():
        paths += list(spec.read(os.path.join(root, spec.synthetic_root), "private", False).gallery_paths)
    return paths[:: max(1, len(paths) // n)][:n]


def write_pink_noise(out, frame, count, seed=0, quality=90):
    """``count`` JPEGs of colour noise with a 1/f amplitude spectrum (natural images' second-order
    statistics), ``frame`` = (w, h), in ``out``; returns their paths."""
    w, h = frame
    rng = np.random.default_rng(seed)
    freq = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    freq[0, 0] = 1.0
    mixing = np.array([[1.0, 0.8, 0.7], [0.1, 0.3, 0.2], [0.05, 0.1, 0.3]])  # correlated colour channels
    paths = []
    for i in range(count):
        spectra = (rng.normal(size=(3, *freq.shape)) + 1j * rng.normal(size=(3, *freq.shape))) / freq
        planes = np.fft.irfft2(spectra, s=(h, w))
        planes = (planes - planes.mean(axis=(1, 2), keepdims=True)) / planes.std(axis=(1, 2), keepdims=True)
        pixels = np.clip(128 + 45 * np.moveaxis(planes, 0, -1) @ mixing, 0, 255).astype(np.uint8)
        paths.append(os.path.join(str(out), f"pink_{w}x{h}_{i:05d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], "JPEG", quality=quality)
    return paths


def _timed(fn, repeats):
    """``fn()`` and the median seconds of ``repeats`` further calls (the first, untimed, warms the page
    cache and lazy imports; its result is the one kept)."""
    result = fn()
    return result, statistics.median(timed_calls(fn, repeats))


def _pixels_pil(paths, images):
    return torch.stack([images.read(p) for p in paths])


def _pixels_nvjpeg(paths, images, batch, device):
    """The nvjpeg path: workers' read (bytes + header), then batched decode/crop/resize on ``device``."""
    out = []
    for start in range(0, len(paths), batch):
        items = [(images.read(p), 0, i) for i, p in enumerate(paths[start:start + batch])]
        encoded = images.collate(items)[0]
        out.append(decode_on_device(encoded, images.size, device).round().to(torch.uint8).cpu())
    return torch.cat(out)


def _embed(model, pixels):
    """L2-normalised embeddings of uint8 model inputs."""
    with torch.no_grad():
        return torch.cat([torch.nn.functional.normalize(model.embed(normalise(chunk)), dim=1)
                          for chunk in pixels.split(32)])


def _measure_folder(root, args, model, paths=None):
    paths = paths or gallery_images(root, args.images)
    sizes = [os.path.getsize(p) for p in paths]
    pil_in = ImageInput(args.size)
    rows, pixels = {}, {}
    with tempfile.TemporaryDirectory(prefix="advbct-preresized-") as tmp:
        # the copy covers the whole root (lists valid); one worker: its rate is per core
        made = preresize(root, tmp, short_side=args.short_side, workers=1, progress=False)
        small = [os.path.join(tmp, os.path.relpath(p, root)) for p in paths]
        runs = {
            "pil": lambda: _pixels_pil(paths, pil_in),
            "pil_draft": lambda: _pixels_pil(paths, ImageInput(args.size, "pil_draft")),
            "nvjpeg_cpu": lambda: _pixels_nvjpeg(paths, ImageInput(args.size, "nvjpeg"), args.batch, "cpu"),
            "preresized": lambda: _pixels_pil(small, pil_in),
        }
        for mode, fn in runs.items():
            pixels[mode], seconds = _timed(fn, args.repeats)
            rows[mode] = {"img_s_per_core": round(len(paths) / seconds, 1)}
        nvjpeg = ImageInput(args.size, "nvjpeg")  # what its DataLoader workers do: no pixel decoded
        _, seconds = _timed(lambda: [nvjpeg.read(p) for p in paths], args.repeats)
        rows["nvjpeg_read"] = {"img_s_per_core": round(len(paths) / seconds, 1)}
        small_bytes = float(np.mean([os.path.getsize(p) for p in small]))
    if torch.cuda.is_available():
        rows["nvjpeg"] = _measure_gpu(paths, args)
        pixels["nvjpeg"] = _pixels_nvjpeg(paths, ImageInput(args.size, "nvjpeg"), args.batch, "cuda")
    ref = pixels["pil"].float()
    emb_ref = _embed(model, pixels["pil"]) if model is not None else None
    for mode, row in rows.items():
        if "img_s_per_core" in row:
            row["vs_pil"] = round(row["img_s_per_core"] / rows["pil"]["img_s_per_core"], 2)
        if mode not in pixels:  # nvjpeg_read makes no pixels
            continue
        row["pixel_mad"] = round(float((pixels[mode].float() - ref).abs().mean()), 3)
        if model is not None:
            cos = (_embed(model, pixels[mode]) * emb_ref).sum(1)
            row["cosine_mean"], row["cosine_min"] = round(float(cos.mean()), 5), round(float(cos.min()), 5)
    with Image.open(paths[0]) as img:
        w, h = img.size
    return {"root": root, "image_size": f"{w}x{h}", "images": len(paths),
            "kbytes_per_image": round(float(np.mean(sizes)) / 1024, 1),
            "preresized_kbytes_per_image": round(small_bytes / 1024, 1),
            "preresize_img_s_per_core": made["images_per_s"], "modes": rows}


def _measure_gpu(paths, args):
    """nvjpeg with CUDA: the workers' per-core cost (read bytes, parse the header) and the GPU's images/s."""
    images = ImageInput(args.size, "nvjpeg")
    items, read = _timed(lambda: [images.read(p) for p in paths], args.repeats)
    batches = [images.collate([(item, 0, i) for i, item in enumerate(items[s:s + args.batch])])[0]
               for s in range(0, len(items), args.batch)]

    def decode():
        for b in batches:
            decode_on_device(b, images.size, "cuda")
        torch.cuda.synchronize()

    _, gpu = _timed(decode, args.repeats)
    return {"worker_img_s_per_core": round(len(paths) / read, 1), "gpu_img_s": round(len(paths) / gpu, 1)}


def run(args):
    """Figures per folder (see the module docstring)."""
    torch.set_num_threads(1)  # per core: one process, one thread
    model = None
    if args.weights:
        from advbct.models import load_trained_model
        model = load_trained_model(args.arch, args.weights, "--weights", device="cpu").eval()
    frames = [parse_frame(f) for f in args.generate.split(",") if f]
    if not (frames or args.data):
        raise UserError("loader: give --generate WxH[,WxH] and/or --data ROOT")
    folders = []
    writers = {"generated photographs": write_photos}
    if args.pink:
        writers["pink-noise JPEGs"] = write_pink_noise
    for frame in frames:
        for what, write in writers.items():
            with tempfile.TemporaryDirectory(prefix="advbct-photos-") as tmp:
                folders.append(_measure_folder(tmp, args, model, write(tmp, frame, args.images)))
                folders[-1]["root"] = f"{args.images} {what}"
    folders += [_measure_folder(root, args, model) for root in args.data]
    return {"setup": {"size": args.size, "images": args.images, "repeats": args.repeats,
                      "short_side": args.short_side, "weights": args.weights or None, "arch": args.arch,
                      "threads": 1},
            "folders": folders}
