"""Google Landmarks v2: official CSVs -> image lists, and the GLDv2 retrieval test set.

Files written by :func:`prepare_gldv2` (formats of the original OpenCompatible / AdvBCT code, which
users of that code already have; paths are relative to the GLDv2 image root):

* ``label_<C>.txt`` (``label_81313.txt`` for the real set): the clean train set, one
  ``train/a/b/c/<id>.jpg <label>`` per line (a, b, c = first three characters of the id, the official
  directory layout), labels = landmark ids remapped to 0..C-1 in increasing landmark-id order, lines
  grouped by label in ``train_clean.csv`` order;
* ``gldv2_label_map.csv``: ``label,landmark_id``, the remapping;
* ``gldv2_gallery_list.txt``: ``index/a/b/c/<id>.jpg <i>``, the index set in ``index.csv`` order;
* ``gldv2_{private,public}_query_list.txt``: ``test/a/b/c/<id>.jpg <q>``, the queries of that Usage in
  ``retrieval_solution_v2.1.csv`` order (``Ignored`` rows are dropped);
* ``gldv2_{private,public}_query_gt.txt``: ``test/a/b/c/<id>.jpg <q> <i1>,<i2>,...``, the gallery
  indices of the query's relevant index images, in solution order.
"""

import csv
import io
import os
import re
from dataclasses import dataclass

import numpy as np

from advbct.data.files import missing_files
from advbct.data.image_list import read_image_list
from advbct.errors import UserError

SPLITS = ("private", "public")
TRAIN_CLEAN_CSV = "train_clean.csv"
TRAIN_CSV = "train.csv"
INDEX_CSV = "index.csv"
TEST_CSV = "test.csv"
SOLUTION_CSV = "retrieval_solution_v2.1.csv"
LABEL_MAP = "gldv2_label_map.csv"
GALLERY_LIST = "gldv2_gallery_list.txt"
_BAD_ID_CHARS = re.compile(r"[/\s]")


def train_list_name(num_classes):
    """File name of the full clean train list (``label_81313.txt`` for the real GLDv2-clean)."""
    return f"label_{int(num_classes)}.txt"


def query_list_name(split):
    """File name of the query list of ``split`` ('private' or 'public')."""
    return f"gldv2_{split}_query_list.txt"


def query_gt_name(split):
    """File name of the query ground truth of ``split`` ('private' or 'public')."""
    return f"gldv2_{split}_query_gt.txt"


def image_relpath(folder, image_id):
    """Official GLDv2 location of an image: ``<folder>/<a>/<b>/<c>/<id>.jpg``."""
    return f"{folder}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


# ----------------------------------------------------------------------------------------------- CSVs


def read_csv_columns(path, columns):
    """Read the named ``columns`` of a CSV with a header row; returns one list of str per column.

    Files without quotes (all official GLDv2 CSVs) take a fast path of plain splits; others go through
    the ``csv`` module.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (official GLDv2 metadata CSV; see Dataset.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if "," not in text and '"' not in text:  # one-column file (index.csv, test.csv): no splitting
        lines = text.splitlines()
        header = [lines[0].strip()] if lines else []
        _require_columns(path, header, columns)
        return [[line for line in lines[1:] if line]]
    rows = list(csv.reader(io.StringIO(text))) if '"' in text else [line.split(",") for line in text.splitlines()]
    header = [h.strip() for h in rows[0]] if rows else []
    _require_columns(path, header, columns)
    rows = rows[1:]
    widths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    blank = np.fromiter((len(r) <= 1 and not "".join(r).strip() for r in rows), dtype=bool, count=len(rows))
    bad = np.flatnonzero((widths != len(header)) & ~blank)
    if len(bad):
        raise UserError(f"{path}:{int(bad[0]) + 2}: expected {len(header)} fields, got {int(widths[bad[0]])}")
    if blank.any():
        rows = [r for r, b in zip(rows, blank) if not b]
    if not rows:
        return [[] for _ in columns]
    transposed = list(zip(*rows))
    return [list(transposed[header.index(c)]) for c in columns]


def _require_columns(path, header, columns):
    if not header:
        raise UserError(f"{path}: empty file, expected a header with columns {', '.join(columns)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} in header {','.join(header)}")


def _check_ids(ids, path, one_per_row=True):
    """Image ids must be at least 3 characters (the layout uses the first three), without '/' or
    whitespace, and unique. ``one_per_row``: ids[i] is on CSV line i + 2, so errors can name the line.
    """
    # C-speed screening over all ids at once; the slow scan only runs to locate a bad id
    if ids and (min(map(len, ids)) < 3 or _BAD_ID_CHARS.search("".join(ids))):
        bad = next(i for i, x in enumerate(ids) if len(x) < 3 or _BAD_ID_CHARS.search(x))
        where = f"{path}:{bad + 2}" if one_per_row else str(path)
        raise UserError(f"{where}: malformed image id {ids[bad]!r}")
    if len(set(ids)) != len(ids):
        seen = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise UserError(f"{path}: image id {dup!r} listed more than once")
    return np.asarray(ids, dtype=str)


def _parse_int_column(values, path, column):
    """Column of decimal integers as int64; UserError names the first bad line."""
    try:
        return np.array(values, dtype=np.int64)
    except (ValueError, OverflowError):
        for i, v in enumerate(values):
            try:
                int(v)
            except ValueError:
                raise UserError(f"{path}:{i + 2}: column {column}: {v!r} is not an integer") from None
        raise UserError(f"{path}: column {column}: integer out of range") from None


def build_train_list(train_clean_csv, train_csv=None):
    """GLDv2-clean train set from ``train_clean.csv`` (landmark_id, space-separated image ids).

    Returns ``(image_ids: str array, labels: int64 array, landmark_ids: int64 array)`` where
    ``landmark_ids[label]`` is the original landmark id (labels follow increasing landmark id). When
    ``train_csv`` (id, url, landmark_id) is given, every clean image must appear there with the same
    landmark id.
    """
    landmark_col, images_col = read_csv_columns(train_clean_csv, ["landmark_id", "images"])
    landmarks = _parse_int_column(landmark_col, train_clean_csv, "landmark_id")
    per_row = [cell.split() for cell in images_col]
    empty = next((i for i, ids in enumerate(per_row) if not ids), None)
    if empty is not None:
        raise UserError(f"{train_clean_csv}:{empty + 2}: landmark {landmarks[empty]} has no images")
    uniq_lm, lm_counts = np.unique(landmarks, return_counts=True)
    if len(uniq_lm) != len(landmarks):
        dup = int(uniq_lm[np.flatnonzero(lm_counts > 1)[0]])
        raise UserError(f"{train_clean_csv}: landmark_id {dup} appears on more than one row")

    counts = np.fromiter(map(len, per_row), dtype=np.int64, count=len(per_row))
    order = np.argsort(landmarks, kind="stable")  # label = rank of the landmark id
    ids = [image_id for i in order for image_id in per_row[i]]
    labels = np.repeat(np.arange(len(landmarks), dtype=np.int64), counts[order])
    id_arr = _check_ids(ids, train_clean_csv, one_per_row=False)

    if train_csv is not None:
        _check_against_train_csv(id_arr, landmarks[order][labels], train_clean_csv, train_csv)
    return id_arr, labels, landmarks[order]


def _check_against_train_csv(ids, landmark_of_image, train_clean_csv, train_csv):
    """Every clean image must be in ``train.csv`` with the same landmark id.

    ``train.csv`` (4.1 M rows with URLs) is streamed line by line, not held in memory; lines without
    quotes are split directly (a field with a comma must be quoted), others go through ``csv``.
    """
    expected = dict(zip(ids.tolist(), landmark_of_image.tolist()))
    try:
        handle = open(train_csv, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{train_csv}: file not found (see Dataset.md)") from None
    with handle:
        header = next(csv.reader([handle.readline()]), [])
        header = [h.strip() for h in header]
        if "id" not in header or "landmark_id" not in header:
            raise UserError(f"{train_csv}: expected a header with columns id, url, landmark_id")
        id_col, lm_col = header.index("id"), header.index("landmark_id")
        for line_no, line in enumerate(handle, start=2):
            row = next(csv.reader([line]), []) if '"' in line else line.rstrip("\r\n").split(",")
            if len(row) <= max(id_col, lm_col):
                if line.strip():
                    raise UserError(f"{train_csv}:{line_no}: expected {len(header)} fields, got {len(row)}")
                continue
            want = expected.pop(row[id_col], None)
            if want is not None and row[lm_col].strip() != str(want):
                raise UserError(
                    f"{train_csv}:{line_no}: image {row[id_col]} has landmark_id {row[lm_col]} but "
                    f"{train_clean_csv} puts it in landmark {want}"
                )
    if expected:
        first = next(iter(expected))
        raise UserError(
            f"{train_clean_csv}: image {first} is not in {train_csv} ({len(expected)} clean images "
            "missing there); are the CSVs from the same release?"
        )


def build_test_lists(index_csv, solution_csv, test_csv=None):
    """Gallery ids (``index.csv`` order) and, per split, query ids + relevant gallery indices.

    Rows of ``retrieval_solution_v2.1.csv`` (id, images, Usage) with Usage ``Ignored`` are dropped
    (their images are ``None``); a Public/Private row must list index ids that exist in ``index.csv``.
    Returns ``(gallery_ids, {split: (query_ids, [int64 array of gallery indices per query])})``.
    """
    (gallery_ids,) = read_csv_columns(index_csv, ["id"])
    gallery_index = {image_id: i for i, image_id in enumerate(gallery_ids)}
    gallery_ids = _check_ids(gallery_ids, index_csv)

    query_col, images_col, usage_col = read_csv_columns(solution_csv, ["id", "images", "Usage"])
    usage = np.char.lower(np.asarray(usage_col, dtype=str))
    unknown = np.flatnonzero(~np.isin(usage, ["private", "public", "ignored"]))
    if len(unknown):
        line = int(unknown[0]) + 2
        raise UserError(f"{solution_csv}:{line}: Usage {usage_col[unknown[0]]!r} is not Public, Private or Ignored")
    _check_ids(query_col, solution_csv)
    if test_csv is not None:
        (test_ids,) = read_csv_columns(test_csv, ["id"])
        test_ids = set(test_ids)
        unknown_query = next((i for i, q in enumerate(query_col) if q not in test_ids), None)
        if unknown_query is not None:
            raise UserError(
                f"{solution_csv}:{unknown_query + 2}: query {query_col[unknown_query]} is not in {test_csv}"
            )

    splits = {}
    for split in SPLITS:
        rows = np.flatnonzero(usage == split)
        query_ids, gts = [], []
        for r in rows:
            wanted = images_col[r].split()
            if not wanted or wanted == ["None"]:
                raise UserError(f"{solution_csv}:{r + 2}: {split} query {query_col[r]} lists no index images")
            found = [gallery_index.get(image_id, -1) for image_id in wanted]
            if -1 in found:
                raise UserError(
                    f"{solution_csv}:{r + 2}: index image {wanted[found.index(-1)]} is not in {index_csv}"
                )
            query_ids.append(query_col[r])
            gts.append(np.array(found, dtype=np.int64))
        splits[split] = (np.asarray(query_ids, dtype=str), gts)
    return gallery_ids, splits


# ------------------------------------------------------------------------------------------- writing


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _missing_images(image_root, relpaths):
    """Boolean mask of the images of ``relpaths`` absent under ``image_root``."""
    return missing_files([os.path.join(image_root, p) for p in relpaths])


def prepare_gldv2(csv_dir, out_dir, image_root=None, skip_missing=False, check_train_csv=True):
    """Write the GLDv2 train list, label map and test lists/ground truth (see module doc) into ``out_dir``.

    ``csv_dir`` holds the official CSVs; ``train.csv`` and ``test.csv`` are optional and only
    cross-checked (streaming the 4.1 M rows of ``train.csv`` takes a few seconds; ``check_train_csv=False``
    skips it). With ``image_root`` every listed image must exist below it; missing train images are
    dropped instead of failing when ``skip_missing`` (index/test images are never dropped: that would
    change the benchmark). Returns a dict of counts.
    """
    csv_dir, out_dir = str(csv_dir), str(out_dir)
    if not os.path.isdir(csv_dir):
        raise UserError(f"{csv_dir}: CSV folder not found (see Dataset.md)")
    optional = {name: os.path.join(csv_dir, name) for name in (TRAIN_CSV, TEST_CSV)}
    optional = {k: (v if os.path.isfile(v) else None) for k, v in optional.items()}
    if not check_train_csv:
        optional[TRAIN_CSV] = None

    train_ids, labels, landmark_ids = build_train_list(os.path.join(csv_dir, TRAIN_CLEAN_CSV), optional[TRAIN_CSV])
    gallery_ids, splits = build_test_lists(
        os.path.join(csv_dir, INDEX_CSV), os.path.join(csv_dir, SOLUTION_CSV), optional[TEST_CSV]
    )
    train_paths = [image_relpath("train", i) for i in train_ids.tolist()]
    gallery_paths = [image_relpath("index", i) for i in gallery_ids.tolist()]
    query_paths = {s: [image_relpath("test", i) for i in q.tolist()] for s, (q, _) in splits.items()}

    dropped = 0
    if image_root is not None:
        image_root = str(image_root)
        if not os.path.isdir(image_root):
            raise UserError(f"{image_root}: GLDv2 image root not found (see Dataset.md)")
        for kind, paths in (("index", gallery_paths), *((f"{s} query", p) for s, p in query_paths.items())):
            missing = _missing_images(image_root, paths)
            if missing.any():
                first = paths[int(np.flatnonzero(missing)[0])]
                raise UserError(
                    f"{os.path.join(image_root, first)}: {kind} image not found ({int(missing.sum())} "
                    f"missing); see Dataset.md"
                )
        missing = _missing_images(image_root, train_paths)
        if missing.any() and not skip_missing:
            first = train_paths[int(np.flatnonzero(missing)[0])]
            raise UserError(
                f"{os.path.join(image_root, first)}: train image not found ({int(missing.sum())} missing; "
                "pass --skip-missing to drop them); see Dataset.md"
            )
        if missing.any():
            dropped = int(missing.sum())
            keep = ~missing
            train_paths = [p for p, k in zip(train_paths, keep) if k]
            kept_landmarks, labels = np.unique(labels[keep], return_inverse=True)
            landmark_ids = landmark_ids[kept_landmarks]

    os.makedirs(out_dir, exist_ok=True)
    num_classes = len(landmark_ids)
    label_list = labels.tolist()
    _write_lines(os.path.join(out_dir, train_list_name(num_classes)),
                 [f"{p} {l}" for p, l in zip(train_paths, label_list)])
    _write_lines(os.path.join(out_dir, LABEL_MAP),
                 ["label,landmark_id"] + [f"{i},{lm}" for i, lm in enumerate(landmark_ids.tolist())])
    _write_lines(os.path.join(out_dir, GALLERY_LIST), [f"{p} {i}" for i, p in enumerate(gallery_paths)])
    for split, (_, gts) in splits.items():
        paths = query_paths[split]
        _write_lines(os.path.join(out_dir, query_list_name(split)), [f"{p} {q}" for q, p in enumerate(paths)])
        _write_lines(
            os.path.join(out_dir, query_gt_name(split)),
            [f"{p} {q} {','.join(map(str, gt.tolist()))}" for q, (p, gt) in enumerate(zip(paths, gts))],
        )
    return {
        "train_images": len(train_paths),
        "num_classes": num_classes,
        "dropped_missing_train_images": dropped,
        "index_images": len(gallery_paths),
        **{f"{s}_queries": len(p) for s, p in query_paths.items()},
        "train_list": os.path.join(out_dir, train_list_name(num_classes)),
    }


# ------------------------------------------------------------------------------------------- loading


@dataclass
class GLDv2Test:
    """GLDv2 retrieval test: absolute query/gallery paths and per-query relevant gallery indices."""

    split: str
    query_paths: np.ndarray
    gallery_paths: np.ndarray
    gt: list  # per query: int64 array of gallery indices


def _read_gt(path, query_relpaths, n_gallery):
    """Parse a ``<query path> <q> <i1>,<i2>,...`` ground-truth file and check it against the query list."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line for line in handle.read().split("\n") if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{path}: ground-truth file not found (run tools/prepare_gldv2.py; see Dataset.md)") from None
    if len(lines) != len(query_relpaths):
        raise UserError(f"{path}: {len(lines)} lines but the query list has {len(query_relpaths)} queries")
    gt = []
    for q, line in enumerate(lines):
        fields = line.split()
        where = f"{path}:{q + 1}"
        if len(fields) != 3:
            raise UserError(f"{where}: expected '<query path> <query index> <i1>,<i2>,...', got {len(fields)} fields")
        if fields[0] != query_relpaths[q] or fields[1] != str(q):
            raise UserError(f"{where}: expected query {query_relpaths[q]} {q}, got {fields[0]} {fields[1]}")
        try:
            indices = np.array(fields[2].split(","), dtype=np.int64)
        except ValueError:
            raise UserError(f"{where}: gallery indices must be comma-separated integers") from None
        if indices.min() < 0 or indices.max() >= n_gallery:
            raise UserError(f"{where}: gallery index out of range [0, {n_gallery})")
        gt.append(indices)
    return gt


def _read_indexed_list(path):
    """A ``path <i>`` list whose integers must be 0, 1, 2, ... (GLDv2 query and gallery lists)."""
    paths, numbers = read_image_list(path)
    wrong = np.flatnonzero(numbers != np.arange(len(numbers)))
    if len(wrong):
        raise UserError(f"{path}: entry {int(wrong[0])} is numbered {int(numbers[wrong[0]])}, expected {int(wrong[0])}")
    return paths


def load_gldv2_test(root, split="private", image_root=None, check_images=True):
    """Load the GLDv2 test set of ``split`` from the lists under ``root`` (images under ``image_root``,
    default ``root``); every image is checked to exist unless ``check_images`` is False."""
    root = str(root)
    split = str(split).lower()
    if split not in SPLITS:
        raise UserError(f"unknown GLDv2 test split '{split}' (expected private or public)")
    if not os.path.isdir(root):
        raise UserError(f"{root}: GLDv2 root not found (see Dataset.md)")
    image_root = root if image_root is None else str(image_root)
    query_rel = _read_indexed_list(os.path.join(root, query_list_name(split)))
    gallery_rel = _read_indexed_list(os.path.join(root, GALLERY_LIST))
    gt = _read_gt(os.path.join(root, query_gt_name(split)), query_rel.tolist(), len(gallery_rel))
    query_paths = np.char.add(os.path.join(image_root, ""), query_rel) if len(query_rel) else query_rel
    gallery_paths = np.char.add(os.path.join(image_root, ""), gallery_rel) if len(gallery_rel) else gallery_rel
    if check_images:
        for paths in (query_paths, gallery_paths):
            missing = _missing_images("", paths.tolist())
            if missing.any():
                raise UserError(
                    f"{paths[int(np.flatnonzero(missing)[0])]}: image not found ({int(missing.sum())} of "
                    f"{len(paths)} missing); see Dataset.md"
                )
    return GLDv2Test(split=split, query_paths=query_paths, gallery_paths=gallery_paths, gt=gt)
