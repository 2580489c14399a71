"""Experiment configuration: defaults for every key, YAML merge, ``KEY VALUE`` command-line overrides.

Usage mirrors the original release (``--cfg file.yml MODEL.ARCH resnet50 EVAL.DATASET roxford5k``) but the
config is plain data: a nested dict with attribute access, checked against :data:`DEFAULTS`, so an
unknown key or a value of the wrong type is an error naming the key and the closest valid one.
"""

import argparse
import copy
import difflib
import os

import yaml

from advbct.errors import UserError
from advbct.io import atomic_open
from advbct.losses.registry import config_section

# Every key: (default, one-line description). Sections are nested dicts.
DEFAULTS = {
    "SEED": (1234, "global random seed (the original code uses 1234)"),
    "OUTPUT": ("./output/run", "directory for checkpoints, logs, resolved config and results"),
    "MODEL": {
        "ARCH": ("resnet18", "backbone of the model being trained/evaluated: a torchvision name (resnet50) or "
                 "timm:<name>[.<pretrained tag>] (timm:resnet50.a1_in1k, timm:convnext_tiny; pip install timm)"),
        "EMB_DIM": (256, "embedding size (Linear no bias -> BatchNorm1d head)"),
        "PRETRAINED": (True, "start from ImageNet weights: torchvision archs from a local file or the torch hub "
                       "cache (never downloaded); timm: archs timm's own way (Hugging Face cache, downloaded "
                       "when online)"),
        "PRETRAINED_PATH": ("", "backbone weights (torchvision file, or advbct checkpoint); empty = hub cache"),
        "WEIGHTS": ("", "trained checkpoint to load (evaluation, fine-tuning); ours or the original format"),
        "ZERO_INIT_RESIDUAL": (False, "resnets trained from scratch: zero-init the last BN of each residual "
                               "branch (Goyal et al. 2017); loaded weights overwrite it"),
        "NUM_CLASSES": (0, "classifier outputs; 0 = max label of DATA.TRAIN_LIST + 1"),
        "SYNC_BN": (True, "convert BatchNorm to SyncBatchNorm when training on several processes"),
    },
    "OLD_MODEL": {
        "ARCH": ("resnet18", "backbone of the old model phi_o"),
        "WEIGHTS": ("", "checkpoint of the trained old model (needed by every compatibility method)"),
        "NUM_CLASSES": (0, "classes of the old model (old labels 0..N-1); 0 = read from its checkpoint"),
        "EARLIER_WEIGHTS": ([], "checkpoints of the models before the old one (oldest first) that the new model "
                            "is also trained compatible with: one more COMP_LOSS term each; [] = none"),
        "EARLIER_ARCHS": ([], "their backbones: one for all or one per checkpoint; [] = OLD_MODEL.ARCH"),
        "EARLIER_META_PATHS": ([], "their class meta files, one per checkpoint, for a method that reads one"),
    },
    "NEW_MODEL": {
        "ARCH": ("resnet18", "backbone of the new model in evaluation (scripts/test.sh)"),
        "WEIGHTS": ("", "checkpoint of the new model in evaluation (scripts/test.sh)"),
    },
    "LOSS": {
        "TYPE": ("softmax", "classification head: softmax | arcface | cosface"),
        "SCALE": (30.0, "scale s of the margin heads"),
        "MARGIN": (0.3, "margin m of the margin heads"),
    },
    "DATA": {
        "TRAIN_LIST": ("", "training list file, lines 'relative/path label'"),
        "ROOT": ("", "directory the paths of DATA.TRAIN_LIST are relative to"),
        "IMG_SIZE": (224, "images are resized whole to IMG_SIZE x IMG_SIZE"),
        "AUGMENT": ("none", "training augmentation: none (the paper) | flip | crop_flip (random crop of "
                    "CROP_SCALE of the area, then flip)"),
        "CROP_SCALE": ([0.5, 1.0], "crop_flip: [min, max] fraction of the image area kept"),
        "NUM_WORKERS": (-1, "DataLoader worker processes per rank; -1 = auto: min(8, CPUs / local ranks - 1) "
                        "(advbct/data/workers.py)"),
        "DECODE": ("pil", "image decoding in training, meta extraction and evaluation: pil (the release's) | "
                   "pil_draft (JPEGs decoded at 1/2-1/8 scale in the DCT domain, never below the resize's size) | "
                   "nvjpeg (decoded, resized and normalised on the CUDA GPU; JPEG only); advbct/data/decoding.py"),
    },
    "META": {
        "TRAIN_LIST": ("", "old model's training list, embedded by scripts/extract_meta.sh"),
        "ROOT": ("", "directory the paths of META.TRAIN_LIST are relative to; empty = DATA.ROOT"),
    },
    "TRAIN": {
        "EPOCHS": (30, "training epochs"),
        "BATCH_SIZE": (256, "images per process (the paper: 256 x 4 GPUs)"),
        "LR": (0.1, "SGD learning rate"),
        "MOMENTUM": (0.9, "SGD momentum"),
        "WEIGHT_DECAY": (5e-4, "SGD weight decay, on all parameters as the original"),
        "LR_STEPS": ([5, 10, 20], "MultiStepLR milestones (epochs)"),
        "LR_GAMMA": (0.1, "MultiStepLR factor"),
        "AMP": ("none", "mixed precision: none | bf16 | fp16 (CUDA only) | auto (bf16 where the device computes "
                "it natively, else fp16 on CUDA GPUs sm_70+, else none; advbct/engine/precision.py)"),
        "CHANNELS_LAST": (False, "NHWC memory format for the models and batches (same result; faster "
                          "bf16 convolutions on CPU)"),
        "SAVE_FREQ": (5, "save a checkpoint every N epochs (last.pth is written every epoch)"),
        "EVAL_FREQ": (0, "evaluate self/cross-test every N epochs; 0 = never during training"),
        "PRINT_FREQ": (20, "log every N iterations"),
        "RESUME": ("", "'' (fresh), 'auto' (OUTPUT/last.pth if present) or a checkpoint path"),
        "OVERWRITE": (False, "start afresh in an OUTPUT that holds a run (refused without it): that run's "
                      "checkpoints, log.txt and tb/ events are removed once every input is checked"),
        "MAX_ITERS_PER_EPOCH": (0, "cap iterations per epoch (smoke tests); 0 = full epoch"),
    },
    # TYPE, WEIGHT, META_PATH and every registered method's options, declared in the method's own file
    # (advbct/losses/registry.py); the same dict object, so a method registered later adds its keys here
    "COMP_LOSS": config_section(),
    "EVAL": {
        "DATASET_TYPE": ("landmark", "task family (only 'landmark' is implemented)"),
        "DATASET": ("roxford5k", "roxford5k | rparis6k | gldv2, or several comma-separated (one process)"),
        "ROOT": ("./data/ROxfordParis", "dataset root (see Dataset.md); with several sets one root or one per set"),
        "IMG_SIZE": (224, "evaluation images are resized whole to IMG_SIZE x IMG_SIZE"),
        "BATCH_SIZE": (64, "images per extraction batch per process"),
        "NUM_WORKERS": (-1, "DataLoader worker processes per rank; -1 = auto: min(8, CPUs / local ranks - 1) "
                        "(advbct/data/workers.py)"),
        "CROP_QUERY": (False, "crop queries to their bbx (revisitop standard; the original code does not)"),
        "AMP": (False, "extract features under bf16 autocast"),
        "GLDV2_SPLIT": ("private", "gldv2 query split: private | public"),
        "BACKFILL": (False, "also compute the partial-backfilling curve"),
        "BACKFILL_RATIOS": ([0.0, 0.25, 0.5, 0.75, 1.0], "fractions of gallery images re-embedded by the new model"),
        "BACKFILL_UNIT": ("image", "what partial backfilling refreshes: image (seeded permutation of the "
                          "gallery images) | batch (whole gallery batches of BACKFILL_BATCH images drawn by "
                          "Python's random.sample, as the release) | most_changed (the images whose old and "
                          "new embeddings lie farthest apart first)"),
        "BACKFILL_UNITS": ([], "units whose curves are also computed side by side (results.json "
                           "backfill_units), e.g. [image, batch, most_changed]; [] = none"),
        "BACKFILL_BATCH": (16, "images per refreshed gallery batch in BACKFILL_UNIT batch (the release: 16)"),
        "BACKFILL_SEED": (-1, "seed of the refreshed subset; -1 = the unit's default: 0 for image, 100 for "
                          "batch (the release's random.seed(100))"),
        "SAVE_DIR": ("./output/eval", "where results.json is written (several sets: SAVE_DIR/<set>/results.json)"),
        "OLD_FEATURES_CACHE": ("", "directory caching the old model's query/gallery features per test set, "
                               "keyed by the old checkpoint's content and the eval settings; '' = off"),
        "OLD_TRANSFORM": ("", "transformation file (scripts/train_transformation.sh) mapping the old gallery into "
                          "the new space for the cross test and backfilling; '' = none (needs OLD_MODEL.WEIGHTS)"),
    },
    # the old-to-new transformation of forward-compatible training (scripts/train_transformation.sh;
    # advbct/engine/transformation.py); defaults: the FCT paper's (apple/ml-fct configs)
    "TRANSFORM": {
        "TYPE": ("fct", "fct (the FCT paper's network h, trained with an L2 loss) | procrustes (orthogonal "
                 "map in closed form, no training)"),
        "EPOCHS": (80, "fct: training epochs over the embedded DATA.TRAIN_LIST"),
        "LR": (5e-4, "fct: Adam learning rate (peak of the warmup + cosine schedule)"),
        "WEIGHT_DECAY": (2.0 ** -15, "fct: Adam weight decay (the paper's 2^-15)"),
        "WARMUP_EPOCHS": (5, "fct: epochs of linear learning-rate warmup before the cosine decay"),
        "BATCH_SIZE": (1024, "fct: feature pairs per training step"),
        "WIDTH": (2048, "fct: width of the network's mixer layers (the paper's inner_dim)"),
        "DEPTH": (2, "fct: hidden Linear-BN-ReLU layers of that width in the mixer"),
    },
    "GENERATIONS": {  # scripts/test_generations.sh: the compatibility matrix of a chain of models
        "WEIGHTS": ([], "checkpoints of a chain of model generations, oldest first, e.g. [gen1.pth,gen2.pth,gen3.pth]"),
        "ARCHS": ([], "their backbones: one for all or one per checkpoint; [] = resnet18"),
        "NAMES": ([], "their labels in the matrix; [] = phi1, phi2, ..."),
    },
}


BASE_KEY = "_BASE_"  # a config may name base files (a path or a list), merged first in order


class Config(dict):
    """A nested dict with attribute access (``cfg.MODEL.ARCH``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _defaults_to_config(spec):
    return Config({k: _defaults_to_config(v) if isinstance(v, dict) else copy.deepcopy(v[0])
                   for k, v in spec.items()})


def all_keys(spec=DEFAULTS, prefix=""):
    """Every full key name (``SECTION.KEY``) of the schema."""
    out = []
    for k, v in spec.items():
        full = prefix + k
        out.extend(all_keys(v, full + ".") if isinstance(v, dict) else [full])
    return out


def describe(spec=DEFAULTS, prefix=""):
    """Lines ``KEY = default  # description`` for documentation and ``--help``."""
    lines = []
    for k, v in spec.items():
        if isinstance(v, dict):
            lines.extend(describe(v, prefix + k + "."))
        else:
            lines.append(f"{prefix}{k} = {v[0]!r}  # {v[1]}")
    return lines


def _unknown_key(key, source):
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.0)
    hint = f" (closest valid key: {close[0]})" if close else ""
    return UserError(f"{source}: unknown config key '{key}'{hint}")


def _lookup_spec(key, source):
    node = DEFAULTS
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise _unknown_key(key, source)
        node = node[part]
    if isinstance(node, dict):
        raise UserError(f"{source}: '{key}' is a section; set one of its keys, e.g. "
                        f"{key}.{next(iter(node))}")
    return node


def _coerce(key, value, default, source):
    """Check ``value`` against the type of ``default``; ints are accepted where floats are expected."""
    want = type(default)
    expected = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
                list: "a list"}[want]
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif want is str:
        ok = isinstance(value, str)
    else:  # list: elements must match the default's element type
        ok = isinstance(value, (list, tuple))
        if ok and default:
            value = [_coerce(f"{key}[{i}]", v, default[0], source) for i, v in enumerate(value)]
        value = list(value) if ok else value
    if not ok:
        raise UserError(f"{source}: config key '{key}' expects {expected}, got {value!r}")
    return value


def _set(cfg, key, value, source):
    default, _ = _lookup_spec(key, source)
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = _coerce(key, value, default, source)


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + str(k) + ".")
        else:
            yield prefix + str(k), v


def flat_config(tree):
    """``{"SECTION.KEY": value}`` of a nested config dict (e.g. ``cfg.to_dict()`` or a checkpoint's config)."""
    return dict(_flatten(tree))


def _parse_value(text, default):
    """A command-line value for a key whose default is ``default``: for a string key the text itself, verbatim
    (``run #2``, ``2024``, quotes kept); for a typed key parsed as YAML would (``0.1``, ``true``, ``[5, 10]``),
    where a ``#`` is no comment but a wrong value (the text is kept, so the type check names it)."""
    if not isinstance(text, str) or isinstance(default, str) or "#" in text:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None else value


def _merge_file(cfg, cfg_file, chain):
    """Merge ``cfg_file`` into ``cfg``, after the files its ``_BASE_`` names (paths relative to it)."""
    if not os.path.isfile(cfg_file):
        where = f" (named by _BASE_ in {chain[-1]})" if chain else ""
        raise UserError(f"config file not found: {cfg_file}{where}")
    real = os.path.realpath(cfg_file)
    if real in chain:
        raise UserError(f"{cfg_file}: _BASE_ cycle ({' -> '.join(chain + (real,))})")
    try:
        with open(cfg_file) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{cfg_file}: not valid YAML ({first})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{cfg_file}: expected a mapping of config sections at the top level")
    bases = tree.pop(BASE_KEY, [])
    for base in [bases] if isinstance(bases, str) else bases:
        _merge_file(cfg, os.path.join(os.path.dirname(cfg_file), base), chain + (real,))
    for key, value in _flatten(tree):
        _set(cfg, key, value, cfg_file)


def load_config(cfg_file=None, overrides=()):
    """Defaults, then ``cfg_file`` (YAML), then ``KEY VALUE`` pairs from ``overrides``."""
    cfg = _defaults_to_config(DEFAULTS)
    if cfg_file:
        _merge_file(cfg, cfg_file, ())
    overrides = list(overrides)
    if len(overrides) % 2:
        raise UserError(f"command line: overrides come in KEY VALUE pairs; '{overrides[-1]}' has no value")
    for key, text in zip(overrides[::2], overrides[1::2]):
        default, _ = _lookup_spec(key, "command line")
        _set(cfg, key, _parse_value(text, default), "command line")
    return cfg


def save_config(cfg, path):
    """Write the resolved config as YAML (atomically) next to a run's outputs."""
    with atomic_open(path) as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def add_config_arguments(parser):
    """The original's command-line shape: ``--cfg FILE`` then free ``KEY VALUE`` pairs."""
    parser.add_argument("--cfg", default=None, help="YAML experiment config")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides, e.g. MODEL.ARCH resnet50")
    return parser
