"""Pre-resized copy of a dataset root: images shrunk to a short side (default 256 px), every other file kept.

Decoding full-size JPEGs (GLDv2 about 800x600, ROxford/RParis 1024x768) is the data loader's bottleneck; a copy
whose images have a short side of 256 px decodes 2.3-3.5x faster. The copy keeps every relative path and file
name, so the lists stay valid: point DATA.ROOT / EVAL.ROOT at it. The query boxes of revisited ground-truth files
(``gnd_*.pkl``) are rescaled with their query images, so that EVAL.CROP_QUERY stays valid.

Every file is written atomically (:mod:`advbct.io`) and checked, files already in the destination are skipped and
the temporaries of a killed run are removed first: a killed run, rerun, ends byte-identical to an uninterrupted
one, and a rerun over a finished copy changes nothing. ``DST/PRESIZED.json`` holds the settings (a run with other
settings is refused) and, once a run has finished, the counts of the copy; ``DST/preresize_corrupt.txt`` lists the
source images that could not be read (not copied).
"""

import contextlib
import io
import json
import multiprocessing
import os
import pickle
import re
import signal
import sys
import time

import numpy as np
from PIL import Image, UnidentifiedImageError

from advbct.data.safe_pickle import safe_load_pickle
from advbct.data.workers import usable_cpus
from advbct.errors import UserError
from advbct.io import atomic_open, atomic_path, is_temporary, write_json_atomic, write_text_atomic

__all__ = ["FORMAT_VERSION", "SETTINGS_FILE", "CORRUPT_FILE", "IMAGE_EXTENSIONS", "target_size", "rescale_box",
           "is_leftover_temporary", "preresize"]

FORMAT_VERSION = 1
SETTINGS_FILE = "PRESIZED.json"
CORRUPT_FILE = "preresize_corrupt.txt"
OWN_FILES = (SETTINGS_FILE, CORRUPT_FILE)  # at the root of a copy: never taken from a source that is a copy itself
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
GND_FILE = re.compile(r"^gnd_(?P<name>.+)\.pkl$")
# The resampling filter: LANCZOS on the full image, without reducing_gap. BICUBIC with reducing_gap is about 20 %
# faster here, but first box-reduces the image; this runs once offline, so the exact antialiased filter wins.
RESAMPLE = "lanczos"
# JPEG chroma at half resolution in both directions: what camera and web JPEGs (GLDv2, ROxford) carry already,
# and half the chroma data to decode. Optimised Huffman tables make the files about 7 % smaller at 3 % more time.
JPEG_SUBSAMPLING = "4:2:0"
JPEG_OPTIMIZE = True
GND_PICKLE_PROTOCOL = 3  # that of the revisitop files; safe_load_pickle reads it, numpy arrays included
SETTING_KEYS = ("format_version", "source", "short_side", "quality", "resample", "jpeg_subsampling",
                "jpeg_optimize")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

_IMAGE, _GND, _OTHER = "image", "gnd", "other"


def target_size(width, height, short_side):
    """(width, height) of an image resized to ``short_side`` on its short side, aspect ratio kept; the size itself
    when the short side is at most ``short_side`` (never upscaled).

    The long side is round(long * short_side / short), computed exactly in integers (halves to even, as
    Python's round of the exact ratio), so that no float error can move it by a pixel.
    """
    short, long = min(width, height), max(width, height)
    if short <= short_side:
        return width, height
    new_long, rest = divmod(long * short_side, short)
    if 2 * rest > short or (2 * rest == short and new_long % 2):
        new_long += 1
    return (new_long, short_side) if width >= height else (short_side, new_long)


def rescale_box(box, old_size, new_size):
    """Box ``[x1, y1, x2, y2]`` (pixels of an image of ``old_size``) in pixels of the image resized to ``new_size``;
    a list stays a list (of floats), a tuple a tuple, a numpy array an array (of a float dtype)."""
    sx, sy = new_size[0] / old_size[0], new_size[1] / old_size[1]
    scaled = [float(v) * s for v, s in zip(box, (sx, sy, sx, sy))]
    if isinstance(box, (list, tuple)):
        return type(box)(scaled)
    dtype = box.dtype if np.issubdtype(box.dtype, np.floating) else np.float64
    return np.asarray(scaled, dtype=dtype).reshape(box.shape)


def is_leftover_temporary(name, source_names=()):
    """Whether file ``name`` in a copy is the temporary of an unfinished atomic write (a killed run's), not a
    copied file: it has advbct.io's temporary name and no file of the source folder (``source_names``) is so named."""
    return is_temporary(name) and name not in source_names


def _is_settings_temporary(name):
    return is_leftover_temporary(name) and name.startswith(f".{SETTINGS_FILE}.")


def _settings(src, short_side, quality):
    return {"format_version": FORMAT_VERSION, "source": os.path.realpath(src), "short_side": short_side,
            "quality": quality, "resample": RESAMPLE, "jpeg_subsampling": JPEG_SUBSAMPLING,
            "jpeg_optimize": JPEG_OPTIMIZE}


def _one_line(exc):
    """A reason for a listing: one line, without object addresses (the listing is rewritten only when it changes)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (no image format recognised)"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _ADDRESS.sub("", " ".join(text.split()))


# ---------------------------------------------------------------------------------------------- checks and plan


def _check_paths(src, dst):
    """Refuse a missing source, a destination that is the source or inside it (or holds it), or a file."""
    if not os.path.isdir(src):
        raise UserError(f"{src}: source folder not found")
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if src_real == dst_real:
        raise UserError(f"{dst}: the destination is the source folder; choose a new folder")
    if os.path.commonpath([src_real, dst_real]) == src_real:
        raise UserError(f"{dst}: the destination is inside the source folder {src}; choose a folder outside it")
    if os.path.commonpath([src_real, dst_real]) == dst_real:
        raise UserError(f"{dst}: the source folder {src} is inside the destination; choose another folder")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"{dst}: exists and is not a folder")


def _read_settings(dst, wanted):
    """The settings file of copy ``dst`` (None for a missing or empty folder); a foreign non-empty folder, an
    unreadable settings file or other settings are refused."""
    path = os.path.join(dst, SETTINGS_FILE)
    # a run killed while writing the settings file first leaves only its temporary
    if not os.path.isdir(dst) or all(_is_settings_temporary(n) for n in os.listdir(dst)):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{dst}: not empty and has no {SETTINGS_FILE}, so it is not a copy made by this tool; "
                        "refusing to write into it (choose a new or empty folder)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable settings file ({_one_line(exc)})") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: not a readable settings file (expected a JSON object)")
    differing = [k for k in SETTING_KEYS if found.get(k) != wanted[k]]
    if differing:
        said = ", ".join(f"{k} {found.get(k)!r} there, {wanted[k]!r} now" for k in differing)
        raise UserError(f"{path}: the copy was made with other settings ({said}); rerun with its settings or "
                        "choose another destination")
    return found


def _kind(name):
    if name.lower().endswith(IMAGE_EXTENSIONS):
        return _IMAGE
    if GND_FILE.match(name):
        return _GND
    return _OTHER


def _files_in(folder):
    """Names of the files in ``folder`` (empty when it is missing)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _plan(src, dst):
    """Walk ``src`` (sorted, depth first, folder links followed once): per kind, the relative paths still to write,
    the numbers already in ``dst``, and the leftover temporaries in ``dst``'s folders."""
    todo = {_IMAGE: [], _GND: [], _OTHER: []}
    done = {_IMAGE: 0, _GND: 0, _OTHER: 0}
    temporaries, seen, stack = [], set(), [""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(src, rel_dir)
        try:
            identity = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"{folder}: cannot list the source folder ({exc.strerror or exc})") from None
        if (identity.st_dev, identity.st_ino) in seen:
            continue
        seen.add((identity.st_dev, identity.st_ino))
        names = {e.name for e in entries if e.is_file()}
        present = _files_in(os.path.join(dst, rel_dir))
        temporaries += [os.path.join(dst, rel_dir, n) for n in sorted(present) if is_leftover_temporary(n, names)]
        subfolders = []
        for entry in entries:
            if entry.is_dir():
                subfolders.append(os.path.join(rel_dir, entry.name))
            elif entry.name in names and not (rel_dir == "" and entry.name in OWN_FILES):
                kind = _kind(entry.name)
                if entry.name in present:
                    done[kind] += 1
                else:
                    todo[kind].append(os.path.join(rel_dir, entry.name))
        stack += reversed(subfolders)
    return todo, done, temporaries


def _query_images(src, gnd_rel, qimlist):
    """Per query of a gnd file: the relative path of its image in ``src`` (None when absent), in either revisited
    layout (see advbct.data.revisited): ``<gnd folder>/<name>/jpg/<q>.jpg`` or ``<gnd folder>/jpg/<q>.jpg``."""
    folder, name = os.path.dirname(gnd_rel), GND_FILE.match(os.path.basename(gnd_rel)).group("name")
    listed = [(c, _files_in(os.path.join(src, c))) for c in (os.path.join(folder, name, "jpg"),
                                                              os.path.join(folder, "jpg"))]
    return [next((os.path.join(c, f"{q}.jpg") for c, names in listed if f"{q}.jpg" in names), None)
            for q in qimlist]


def _read_gnd(src, rel):
    """The ground truth of gnd file ``rel`` (safely unpickled), checked for what rescaling needs: a dict with a
    ``qimlist`` of names and a ``gnd`` list of one dict per query, whose ``bbx`` (if any) has 4 numbers."""
    path = os.path.join(src, rel)
    cfg = safe_load_pickle(path)
    qimlist = cfg.get("qimlist") if isinstance(cfg, dict) else None
    gnd = cfg.get("gnd") if isinstance(cfg, dict) else None
    if (not isinstance(qimlist, (list, tuple)) or not all(isinstance(q, str) for q in qimlist)
            or not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist)
            or not all(isinstance(g, dict) for g in gnd)):
        raise UserError(f"{path}: not a revisited ground-truth file (expected a dict with 'qimlist', a list of "
                        "names, and 'gnd', one dict per query); its query boxes cannot be rescaled")
    for q, entry in enumerate(gnd):
        if "bbx" in entry:
            try:
                ok = len(entry["bbx"]) == 4 and all(float(v) == float(v) for v in entry["bbx"])
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UserError(f"{path}: gnd[{q}]['bbx'] is not [x1, y1, x2, y2]; the box cannot be rescaled")
    return cfg


# ------------------------------------------------------------------------------------------------- the workers

_job = {}  # src, dst, short_side, quality of the current run, in every process that converts files


def _set_job(src, dst, short_side, quality):
    _job.update(src=src, dst=dst, short_side=short_side, quality=quality)


def _start_worker(parent, *job):
    """Pool initializer: end with the parent even when it is killed (so that no writer outlives a killed run),
    leave Ctrl-C to the parent (which then stops the pool), and take the job's settings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    _set_job(*job)


class _CheckFailed(Exception):
    """A written file did not read back as the image it should be."""


def _check_written(path, size, fmt):
    """Reopen the image file at ``path`` and decode it fully; raise _CheckFailed unless it is ``size`` in ``fmt``."""
    try:
        with Image.open(path) as im:
            im.load()
            got_size, got_format = im.size, im.format
    except Exception as exc:  # noqa: BLE001 - whatever fails to decode, the output is bad
        raise _CheckFailed(f"written file does not decode ({_one_line(exc)})") from None
    if got_size != tuple(size) or got_format != fmt:
        raise _CheckFailed(f"written file is {got_format} {got_size[0]}x{got_size[1]}, "
                           f"expected {fmt} {size[0]}x{size[1]}")


def _write_checked(path, payload, size, fmt):
    """Write ``payload`` to ``path`` atomically, after its temporary reads back as a ``size`` image in ``fmt``."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(payload)
            _check_written(tmp, size, fmt)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({_one_line(exc)})") from None


def _encode(data):
    """Decode the image file ``data`` fully; (payload, size, format, resized) of its copy: the bytes themselves when
    it is small enough, else the resized image encoded in its own kind (JPEG for JPEG, PNG, lossless, otherwise)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes everything: a truncated file raises here (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        fmt = "JPEG" if im.format in ("JPEG", "MPO") else "PNG"  # MPO: a JPEG with extra frames (phone cameras)
        size = target_size(*im.size, _job["short_side"])
        if size == im.size:
            return data, size, im.format, False
        # The loader reads Image.open(path).convert("RGB"), ignoring the EXIF orientation: no exif_transpose here,
        # so the copy holds what the loader sees. Other modes are converted before resizing as the loader does
        # (a palette image resizes only by nearest neighbour, alpha is dropped); grey stays grey, a third the size.
        im = im if im.mode in ("L", "RGB") else im.convert("RGB")
        out = im.resize(size, Image.LANCZOS)  # Image.Resampling needs Pillow 9.1
    # no metadata: EXIF (orientation, thumbnail, old sizes), ICC profile, comments, transparency are all ignored
    # by the loader, and nothing that varies (a timestamp) goes into the file
    out.info = {}
    buffer = io.BytesIO()
    if fmt == "JPEG":
        out.save(buffer, "JPEG", quality=_job["quality"], subsampling=JPEG_SUBSAMPLING, optimize=JPEG_OPTIMIZE)
    else:
        out.save(buffer, "PNG")
    return buffer.getvalue(), size, fmt, True


def _convert(task):
    """Copy (or resize) one file of the source; (kind, rel, status, bytes before, bytes after, reason)."""
    kind, rel = task
    src_path, dst_path = os.path.join(_job["src"], rel), os.path.join(_job["dst"], rel)
    try:
        with open(src_path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        if kind == _IMAGE:
            return kind, rel, "corrupt", 0, 0, f"cannot read ({_one_line(exc)})"
        raise UserError(f"{src_path}: cannot read ({_one_line(exc)})") from None
    if kind != _IMAGE:
        try:
            with atomic_open(dst_path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise UserError(f"{dst_path}: cannot write ({_one_line(exc)})") from None
        return kind, rel, "copied", len(data), len(data), ""
    try:
        payload, size, fmt, resized = _encode(data)
    except Exception as exc:  # noqa: BLE001 - any failure to decode or convert is the file's
        return kind, rel, "corrupt", len(data), 0, _one_line(exc)
    try:
        _write_checked(dst_path, payload, size, fmt)
    except _CheckFailed as exc:
        return kind, rel, "failed", len(data), 0, str(exc)
    return kind, rel, "resized" if resized else "copied", len(data), len(payload), ""


# ------------------------------------------------------------------------------------------------- the run


def _rescale_gnd(src, dst, rel, cfg):
    """Write gnd file ``rel`` into ``dst`` with each query box scaled like its query image was (by the sizes of the
    source and the copied image; unscaled where the copy is absent); copied verbatim when no box changes.
    Returns whether boxes were rescaled."""
    gnd = list(cfg["gnd"])
    changed = False
    for q, image_rel in enumerate(_query_images(src, rel, cfg["qimlist"])):
        if image_rel is None or "bbx" not in gnd[q] or not os.path.isfile(os.path.join(dst, image_rel)):
            continue
        try:
            with Image.open(os.path.join(src, image_rel)) as before, Image.open(os.path.join(dst, image_rel)) as after:
                old_size, new_size = before.size, after.size
        except Exception as exc:  # noqa: BLE001 - the copy exists, so the source was readable: a changed file
            raise UserError(f"{os.path.join(src, image_rel)}: cannot read the size of a query image of {rel} "
                            f"({_one_line(exc)})") from None
        if old_size != new_size:
            gnd[q] = {**gnd[q], "bbx": rescale_box(gnd[q]["bbx"], old_size, new_size)}
            changed = True
    with atomic_open(os.path.join(dst, rel), "wb") as handle:
        if changed:
            pickle.dump({**cfg, "gnd": gnd}, handle, protocol=GND_PICKLE_PROTOCOL)
        else:
            with open(os.path.join(src, rel), "rb") as source:
                handle.write(source.read())
    return changed


def _lock(dst):
    """Hold an exclusive lock on folder ``dst`` for this process's life (Linux/macOS): a second run into the same
    copy at the same time is refused instead of removing the first one's temporaries."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    fd = os.open(dst, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{dst}: another run is writing into this copy now") from None
    return fd


def _write_if_changed(path, text):
    """Write ``text`` to ``path`` atomically unless the file already holds it (so a rerun touches nothing)."""
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)


def _results(stack, tasks, workers, job):
    """The results of converting ``tasks`` with ``workers`` processes (in this one for 1), in any order; the
    processes start now (before any thread of the caller, e.g. the progress bar's) and end with ``stack``."""
    if workers <= 1 or len(tasks) <= 1:
        _set_job(*job)
        return map(_convert, tasks)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = stack.enter_context(context.Pool(workers, _start_worker, (os.getpid(), *job)))
    return pool.imap_unordered(_convert, tasks, chunksize=max(1, min(32, len(tasks) // (8 * workers))))


def preresize(src, dst, short_side=256, quality=95, workers=None, progress=True):
    """Copy dataset root ``src`` to ``dst`` with every image (.jpg .jpeg .png) of a short side above ``short_side``
    resized to it, the rest copied; resumable and idempotent (see the module). Returns the summary of this run."""
    start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 1:
        raise UserError(f"--short-side {short_side}: expected a positive number of pixels")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: expected a JPEG quality from 1 to 100")
    workers = usable_cpus() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers {workers}: expected a positive number of processes")
    _check_paths(src, dst)
    settings = _settings(src, short_side, quality)
    found = _read_settings(dst, settings)
    todo, done, temporaries = _plan(src, dst)
    gnd_files = {rel: _read_gnd(src, rel) for rel in todo[_GND]}  # refused before anything is written

    os.makedirs(dst, exist_ok=True)
    lock = _lock(dst)
    try:
        if found is None:
            write_json_atomic(os.path.join(dst, SETTINGS_FILE), settings)
        for path in temporaries:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        summary = _convert_all(src, dst, settings, todo, done, gnd_files, workers, progress)
    finally:
        if lock is not None:
            os.close(lock)
    summary["wall_s"] = round(time.perf_counter() - start, 3)
    processed = summary["resized"] + summary["copied"] + summary["corrupt"] + summary["failed"]
    summary["images_per_s"] = round(processed / max(summary["wall_s"], 1e-9), 1)
    return summary


def _convert_all(src, dst, settings, todo, done, gnd_files, workers, progress):
    """Convert the planned files, rescale the gnd files, write the listings; the summary without timings."""
    from tqdm import tqdm

    n_images = len(todo[_IMAGE]) + done[_IMAGE]
    counts = {"resized": 0, "copied": 0, "corrupt": 0, "failed": 0, "other_copied": 0}
    sizes = {"bytes_before": 0, "bytes_after": 0}
    corrupt, failed = [], []
    tasks = [(_IMAGE, rel) for rel in todo[_IMAGE]] + [(_OTHER, rel) for rel in todo[_OTHER]]
    job = (src, dst, settings["short_side"], settings["quality"])
    with contextlib.ExitStack() as stack:
        results = _results(stack, tasks, min(workers, max(1, len(tasks))), job)
        bar = stack.enter_context(tqdm(total=n_images, initial=done[_IMAGE], unit="img", desc="preresize",
                                       disable=not progress, file=sys.stderr, dynamic_ncols=True))
        for kind, rel, status, before, after, reason in results:
            if kind != _IMAGE:
                counts["other_copied"] += 1
                continue
            counts[status] += 1
            if status in ("resized", "copied"):
                sizes["bytes_before"] += before
                sizes["bytes_after"] += after
            elif status == "corrupt":
                corrupt.append(f"{rel}\t{reason}\n")
            else:
                failed.append(f"{rel}: {reason}")
            bar.update(1)
    rescaled = sum(_rescale_gnd(src, dst, rel, cfg) for rel, cfg in gnd_files.items())

    corrupt_path = os.path.join(dst, CORRUPT_FILE)
    if corrupt:
        _write_if_changed(corrupt_path, "".join(sorted(corrupt)))
    elif os.path.exists(corrupt_path):
        os.remove(corrupt_path)
    complete = not failed
    # the counts describe the copy, not this run, so that a resumed run ends with the same file; a copy with
    # failed files is not complete (not even when an earlier run over a smaller source was)
    final = settings if failed else {
        **settings, "complete": True, "images": n_images - len(corrupt), "corrupt": len(corrupt),
        "other_files": len(todo[_OTHER]) + len(gnd_files) + done[_OTHER] + done[_GND]}
    # as write_json_atomic writes it
    _write_if_changed(os.path.join(dst, SETTINGS_FILE), json.dumps(final, indent=1, ensure_ascii=False) + "\n")
    written = counts["resized"] + counts["copied"] + counts["other_copied"] + len(gnd_files)
    return {"source": settings["source"], "destination": os.path.realpath(dst),
            "short_side": settings["short_side"], "quality": settings["quality"], "images": n_images,
            **{k: counts[k] for k in ("resized", "copied")}, "skipped": done[_IMAGE],
            **{k: counts[k] for k in ("corrupt", "failed")},
            "other_copied": counts["other_copied"] + len(gnd_files), "gnd_rescaled": rescaled,
            "other_skipped": done[_OTHER] + done[_GND], "written": written, **sizes,
            "complete": complete, "failed_files": sorted(failed)}
