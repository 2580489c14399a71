"""The registry of compatibility methods: every method declares itself in its own file, at import.

A declaration (:func:`register_method`) gives the method's ``COMP_LOSS.TYPE`` name, its label in the
result tables, whether it is a row of the paper's table, its options (``COMP_LOSS`` keys with default,
one-line help and a check of the value), what it needs before its loss can be built (the old-class
meta, the old classifier) and the function that builds the loss from the checked options and a
:class:`BuildContext`. Everything else reads the registry: the COMP_LOSS section of the config schema
(:func:`config_section`), the report labels, ``advbct.losses.build_compat_loss``.

This module imports nothing heavy itself; importing it runs ``advbct/losses/__init__.py`` first, which
imports (and so registers) the built-in methods.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from advbct.errors import UserError

SECTION = "COMP_LOSS"
TYPES = (bool, int, float, str, list)  # what a config key can hold (advbct.config checks values by default type)
RESERVED_NAMES = ("independent",)  # the phi* model folder of the reports, not a method
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")


@dataclass(frozen=True)
class Option:
    """One ``COMP_LOSS.<key>`` option: its default (whose type is the key's type), a one-line help and,
    optionally, the allowed ``choices`` or a ``valid`` predicate with the ``expect`` text of its error."""

    key: str
    default: Any
    help: str
    choices: tuple = ()
    valid: Callable[[Any], bool] | None = None
    expect: str = ""

    @property
    def type(self) -> type:
        return type(self.default)

    def coerce(self, value):
        """``value`` as the key's type (a dict built by hand may hold an int for a float key)."""
        if self.type in (bool, int, float):
            return self.type(value)
        return list(value) if self.type is list else value

    def check(self, value) -> None:
        """Raise a one-line UserError naming the key unless ``value`` is allowed."""
        if self.choices and value not in self.choices:
            raise UserError(f"{SECTION}.{self.key} {value!r}: expected one of {', '.join(map(str, self.choices))}")
        if self.valid is not None and not self.valid(value):
            raise UserError(f"{SECTION}.{self.key} {value!r}: expected {self.expect}")


class Options(dict):
    """The checked COMP_LOSS values a builder reads: the shared keys and the method's own options,
    as ``opts.TEMPERATURE`` or ``opts["TEMPERATURE"]``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets besides the options. ``meta`` is checked against the old model when the method
    needs it (else it may be None); so is ``old_classifier_weight``, (num_old_classes, embed_dim).
    ``classifier``, ``scale`` and ``margin`` are the classification head of the model being trained: the
    LOSS section of the config (LOSS.TYPE softmax | arcface | cosface, LOSS.SCALE, LOSS.MARGIN), for a
    method whose term goes through the new classifier."""

    embed_dim: int
    num_old_classes: int
    total_epochs: int
    meta: Any = None
    old_classifier_weight: Any = None
    classifier: str = "softmax"
    scale: float = 30.0
    margin: float = 0.3


# the keys every method shares besides TYPE and META_PATH (whose help lists the registered methods:
# written by _rebuild_section); TYPE selects the method, META_PATH is read by the engine
SHARED = (Option("WEIGHT", 1.0, "weight of the whole compatibility term"),)
SHARED_KEYS = ("TYPE", "WEIGHT", "META_PATH")


def _flag(flag, opts) -> bool:
    return bool(flag(opts) if callable(flag) else flag)


@dataclass(frozen=True)
class Method:
    """A registered compatibility method (see :func:`register_method`)."""

    name: str
    loss_class: type
    build: Callable[[Options, BuildContext], Any]
    label: str
    plot_label: str
    paper_row: bool
    options: tuple[Option, ...]
    needs_meta: bool | Callable[[Options], bool] = False
    needs_old_classifier: bool | Callable[[Options], bool] = False
    needs_transformation: bool | Callable[[Options], bool] = False
    new_head: Callable[[Options], dict] | None = None
    teacher_key: str | None = None
    meta_classes: str = "old"

    def resolve(self, comp_cfg: Mapping) -> Options:
        """The shared keys and this method's options from ``comp_cfg``, defaults filled in, as their types."""
        return Options({o.key: o.coerce(comp_cfg.get(o.key, o.default)) for o in SHARED + self.options})

    def checked(self, comp_cfg: Mapping) -> Options:
        """:meth:`resolve`, then every option's check (a one-line UserError naming the key)."""
        opts = self.resolve(comp_cfg)
        for o in self.options:
            o.check(opts[o.key])
        return opts

    def requires_meta(self, opts: Options) -> bool:
        return _flag(self.needs_meta, opts)

    def requires_old_classifier(self, opts: Options) -> bool:
        return _flag(self.needs_old_classifier, opts)

    def requires_transformation(self, opts: Options) -> bool:
        return _flag(self.needs_transformation, opts)


_METHODS: dict[str, Method] = {}  # in registration order: the order of the tables and of TYPE's help
_SECTION: dict[str, tuple] = {}  # the live COMP_LOSS schema {key: (default, help)}, rebuilt in place


def register_method(name: str, loss_class: type, *, label: str, build: Callable[[Options, BuildContext], Any],
                    options=(), plot_label: str | None = None, paper_row: bool = True,
                    needs_meta=None, needs_old_classifier=None, needs_transformation=None,
                    new_head: Callable[[Options], dict] | None = None, teacher_key: str | None = None,
                    meta_classes: str = "old") -> Method:
    """Declare compatibility method ``name`` (the ``COMP_LOSS.TYPE`` value) and return its record.

    ``loss_class``: its CompatibilityLoss subclass; ``build(opts, ctx)`` returns an instance from the
    checked :class:`Options` and the :class:`BuildContext`. ``label``: its row in the result tables;
    ``plot_label``: its legend in the backfilling plots (default: ``label``); ``paper_row``: whether it
    is a row of the paper's table. ``options``: its :class:`Option` s (``COMP_LOSS.<key>``; a key that
    another method also declares must have the same default and type). ``needs_meta`` /
    ``needs_old_classifier`` / ``needs_transformation``: a bool or a function of the options (default: the
    loss class's attribute of that name). A method that needs a transformation makes old embeddings
    compatible after training (FCT): its new model trains without the old model and with no term (its
    ``build`` returns None), and its cross test needs EVAL.OLD_TRANSFORM (scripts/train_transformation.sh).
    ``new_head(opts)``: the new model's embedding head when the method changes it (a spec of
    :func:`advbct.models.build_model`'s ``head``, whose ``old_dim`` the engine fills in; BT²). ``teacher_key``:
    one of its options naming the checkpoint of a frozen model (MODEL.ARCH) whose embeddings of each batch
    the loss reads (``aux["teacher"]``). ``meta_classes``: which classes its COMP_LOSS.META_PATH covers: "old"
    (the old model's training list, META.TRAIN_LIST) or "train" (every class of DATA.TRAIN_LIST).
    A conflicting declaration raises ValueError and leaves the registry unchanged.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(f"method name {name!r}: expected lower-case letters, digits and '_', not "
                         f"{', '.join(RESERVED_NAMES)}")
    if name in _METHODS:
        raise ValueError(f"method '{name}' is already registered (unregister_method('{name}') first)")
    if not isinstance(loss_class, type) or not callable(build):
        raise ValueError(f"method '{name}': expected its loss class and a build(opts, ctx) function")
    if not label or any(m.label == label for m in _METHODS.values()):
        raise ValueError(f"method '{name}': label {label!r} is empty or already used by another method")
    options = tuple(options)
    keys = [o.key for o in options]
    if len(set(keys)) != len(keys):
        raise ValueError(f"method '{name}': an option key is declared twice in {keys}")
    for o in options:
        _check_option(name, o)
    teacher = next((o for o in options if o.key == teacher_key), None)
    if teacher_key is not None and (teacher is None or teacher.type is not str):
        raise ValueError(f"method '{name}': teacher_key {teacher_key!r} must be one of its string options {keys}")
    if meta_classes not in ("old", "train"):
        raise ValueError(f"method '{name}': meta_classes {meta_classes!r}: expected 'old' or 'train'")
    if needs_meta is None:
        needs_meta = bool(getattr(loss_class, "needs_meta", False))
    if needs_old_classifier is None:
        needs_old_classifier = bool(getattr(loss_class, "needs_old_classifier", False))
    if needs_transformation is None:
        needs_transformation = bool(getattr(loss_class, "needs_transformation", False))
    method = Method(name=name, loss_class=loss_class, build=build, label=label, plot_label=plot_label or label,
                    paper_row=bool(paper_row), options=options, needs_meta=needs_meta,
                    needs_old_classifier=needs_old_classifier, needs_transformation=needs_transformation,
                    new_head=new_head, teacher_key=teacher_key, meta_classes=meta_classes)
    _METHODS[name] = method
    _rebuild_section()
    return method


def unregister_method(name: str) -> Method:
    """Remove method ``name`` (its options leave the config schema unless another method declares them)."""
    if name not in _METHODS:
        raise KeyError(f"method '{name}' is not registered")
    method = _METHODS.pop(name)
    _rebuild_section()
    return method


def _check_option(method: str, o: Option) -> None:
    if not isinstance(o.key, str) or not _KEY.fullmatch(o.key) or o.key in SHARED_KEYS:
        raise ValueError(f"method '{method}': option key {o.key!r}: expected upper-case letters, digits and "
                         f"'_', not one of the shared keys {', '.join(SHARED_KEYS)}")
    if o.type not in TYPES:
        raise ValueError(f"method '{method}': {SECTION}.{o.key} default {o.default!r} is a {o.type.__name__}; "
                         f"expected one of {', '.join(t.__name__ for t in TYPES)}")
    if not o.help or "\n" in o.help:
        raise ValueError(f"method '{method}': {SECTION}.{o.key} needs a one-line help")
    if o.valid is not None and not o.expect:
        raise ValueError(f"method '{method}': {SECTION}.{o.key} has a check but no 'expect' text for its error")
    try:
        o.check(o.default)
    except UserError as err:
        raise ValueError(f"method '{method}': its default fails its own check ({err})") from None
    for other in _METHODS.values():
        for p in other.options:
            if p.key == o.key and (p.type is not o.type or p.default != o.default):
                raise ValueError(f"method '{method}': {SECTION}.{o.key} = {o.default!r} ({o.type.__name__}) "
                                 f"conflicts with method '{other.name}', which declares it = {p.default!r} "
                                 f"({p.type.__name__}); one key has one default")


def _rebuild_section() -> None:
    names = list(_METHODS)
    with_meta = [n for n, m in _METHODS.items() if m.needs_meta is not False]
    _SECTION.clear()
    _SECTION["TYPE"] = ("", f"compatibility method: '' (none) | {' | '.join(names)}")
    _SECTION["WEIGHT"] = (SHARED[0].default, SHARED[0].help)
    over_train = [n for n, m in _METHODS.items() if m.meta_classes == "train"]
    _SECTION["META_PATH"] = ("", "class meta file (scripts/extract_meta.sh): the old model's class centers and radii "
                                 "over its training list" + (f" ({', '.join(over_train)}: over DATA.TRAIN_LIST)"
                                                             if over_train else "")
                                 + f"; needed by {', '.join(with_meta) or 'none'}")
    for method in _METHODS.values():
        for o in method.options:
            _SECTION.setdefault(o.key, (o.default, o.help))


def config_section() -> dict:
    """The COMP_LOSS section of the config schema, ``{key: (default, one-line help)}``: TYPE, WEIGHT,
    META_PATH, then every registered option. The same dict object always, updated in place when a
    method is registered or unregistered (advbct.config holds it in its DEFAULTS)."""
    return _SECTION


def list_methods(paper_rows: bool = False) -> list[str]:
    """Registered method names in registration order (only the paper's table rows if ``paper_rows``)."""
    return [n for n, m in _METHODS.items() if m.paper_row or not paper_rows]


def get_method(name: str) -> Method:
    """The declaration of ``name``; an unknown name is a one-line UserError listing the valid ones."""
    if name not in _METHODS:
        raise UserError(f"{SECTION}.TYPE '{name}': expected '' (none) or one of {', '.join(_METHODS)}")
    return _METHODS[name]


def is_registered(name) -> bool:
    return name in _METHODS


def labels() -> dict[str, str]:
    """``{name: table label}`` of every registered method (e.g. hot_refresh: HotRefresh)."""
    return {n: m.label for n, m in _METHODS.items()}


def plot_labels() -> dict[str, str]:
    """``{name: plot legend label}`` of every registered method (e.g. hot_refresh: Hot-refresh)."""
    return {n: m.plot_label for n, m in _METHODS.items()}


class _LossClasses(Mapping):
    """Read-only live view ``{name: loss class}`` of the registry."""

    def __getitem__(self, name):
        return _METHODS[name].loss_class

    def __iter__(self):
        return iter(list(_METHODS))

    def __len__(self):
        return len(_METHODS)

    def __repr__(self):
        return repr(dict(self))


LOSS_CLASSES = _LossClasses()
