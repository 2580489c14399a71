"""Dependencies point down: every ``import`` of every module of the package (top-level or inside a function,
absolute or relative, and ``importlib.import_module("...")`` with a literal name) is read with ``ast`` and
checked against the layer table below. Nothing is imported to check it.

============= ============================================= ===========================================
layer         modules                                       may import (besides its own layer)
============= ============================================= ===========================================
foundation    advbct (the package itself), advbct.errors,   nothing above
              advbct.io, advbct.meta, advbct.world,
              advbct.distributed, advbct.launch
data          advbct.data                                   foundation
models        advbct.models                                 foundation
losses        advbct.losses                                 foundation, data, models
configuration advbct.config, advbct.cli                     foundation, data, models, losses
evaluation    advbct.evaluation                             foundation ... configuration
engine        advbct.engine                                 foundation ... evaluation
pipelines     advbct.pipelines                              all of the package
tools         tools/ (scripts, tools/benchmarks)            everything; no package module imports them
============= ============================================= ===========================================

data and models are two independent bottom layers: neither imports the other today (models build
networks and read checkpoints; data reads lists and images), and the table keeps it so.

The shared modules, by what each imports of the package today: errors, io and launch nothing (errors and
io stay leaves: every layer uses them); meta errors, io; distributed errors, world; world errors.
config imports errors, io and advbct.losses.registry (the COMP_LOSS schema is the registry's: importing it
registers the built-in methods), so config sits above losses; cli imports errors and, inside
``config_main``, config and distributed, so it sits with config.

Code under ``if __name__ == "__main__":`` is a script's entry point, not a dependency of the module, and
is not checked (world's entry uses cli's ``guarded``).

A module of the package that the table does not name fails the test: a new module or package is placed
in a layer here when it is added.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "advbct"

FOUNDATION = ("advbct", "advbct.errors", "advbct.io", "advbct.meta", "advbct.world", "advbct.distributed",
              "advbct.launch")
LEAVES = ("advbct.errors", "advbct.io")  # foundation modules that import nothing of the package
LAYERS = {"advbct.data": "data", "advbct.models": "models", "advbct.losses": "losses",
          "advbct.config": "configuration", "advbct.cli": "configuration",
          "advbct.evaluation": "evaluation", "advbct.engine": "engine", "advbct.pipelines": "pipelines",
          **{name: "foundation" for name in FOUNDATION}}
BELOW = {
    "foundation": set(),
    "data": {"foundation"},
    "models": {"foundation"},
    "losses": {"foundation", "data", "models"},
    "configuration": {"foundation", "data", "models", "losses"},
    "evaluation": {"foundation", "data", "models", "losses", "configuration"},
    "engine": {"foundation", "data", "models", "losses", "configuration", "evaluation"},
    "pipelines": {"foundation", "data", "models", "losses", "configuration", "evaluation", "engine"},
}


def layer_of(name):
    """Layer of the dotted module (or attribute) name ``name`` of the package: its longest prefix in LAYERS."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def tool_names():
    """Top-level names under which tools/ code is importable (tools/ and tools/benchmarks on sys.path)."""
    names = {"tools"}
    for path in (REPO / "tools").iterdir():
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            names.add(path.stem)
    return names


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_main_guard(node):
    """``if __name__ == "__main__":`` at a module's top level."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def imported_names(source, module, is_package=False):
    """``(line, dotted name)`` of everything ``source`` (the code of ``module``) imports; for
    ``from X import a`` the name is ``X.a`` (a submodule or an attribute of X: both lie in X's layer)."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    entry = {id(node) for top in tree.body if _is_main_guard(top) for node in ast.walk(top)}
    found = []
    for node in ast.walk(tree):
        if id(node) in entry:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source, module, is_package=False):
    """Imports of ``module``'s code that break the table, as readable lines."""
    own = layer_of(module)
    if own is None:
        return [f"{module}: module not in the layer table (add it to LAYERS in tests/test_layering.py)"]
    tools = tool_names()
    bad = []
    for line, name in imported_names(source, module, is_package):
        top = name.split(".")[0]
        if top in tools:
            bad.append(f"{module}:{line} imports {name} (tools sit above the package)")
            continue
        if top != "advbct":
            continue
        target = layer_of(name)
        if target == own:
            if module in LEAVES and name.split(".")[:2] != module.split(".")[:2]:
                bad.append(f"{module}:{line} imports {name} ({module} imports nothing of the package)")
            continue
        if target not in BELOW[own]:
            bad.append(f"{module}:{line} imports {name} ({own} may not import {target})")
    return bad


def package_modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    assert [module_name(p) for p in package_modules() if layer_of(module_name(p)) is None] == []


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    source = path.read_text(encoding="utf-8")
    assert violations(source, module_name(path), path.name == "__init__.py") == []


def test_evaluation_needs_no_engine():
    """The rule this test was written for: model loading comes from the models layer."""
    source = (PACKAGE / "evaluation" / "evaluate.py").read_text(encoding="utf-8")
    names = [name for _, name in imported_names(source, "advbct.evaluation.evaluate")]
    assert "advbct.models.load_trained_model" in names and "advbct.models.check_same_embedding" in names
    assert not [name for name in names if name.startswith("advbct.engine")]


@pytest.mark.parametrize("module, code", [
    ("advbct.evaluation.evaluate", "from advbct.engine.builders import load_trained_model\n"),
    ("advbct.evaluation.evaluate", "def f():\n    import advbct.engine.trainer\n"),
    ("advbct.evaluation.evaluate", "from advbct import engine\n"),
    ("advbct.evaluation.evaluate", "from ..engine import builders\n"),
    ("advbct.evaluation.evaluate", "import importlib\nimportlib.import_module('advbct.engine.trainer')\n"),
    ("advbct.evaluation.protocol", "from advbct.pipelines.stamps import stamp_outputs\n"),
    ("advbct.losses.base", "from advbct.evaluation.metrics import gldv2_map_at_k\n"),
    ("advbct.models.network", "from advbct.data.transforms import eval_transform\n"),
    ("advbct.data.splits", "from advbct.models import build_model\n"),
    ("advbct.config", "from advbct.evaluation.reporting import make_table\n"),
    ("advbct.meta", "from advbct.config import load_config\n"),
    ("advbct.losses.base", "from advbct.config import DEFAULTS\n"),
    ("advbct.distributed", "from advbct.models import build_model\n"),
    ("advbct.world", "def main():\n    from advbct.cli import guarded\n"),
    ("advbct.world", "if __name__ != '__main__':\n    from advbct.cli import guarded\n"),
    ("advbct.io", "from advbct.errors import UserError\n"),
    ("advbct.engine.trainer", "from gpu_check import write_json\n"),
    ("advbct.evaluation.reporting", "from benchmarks.metrics import run\n"),
])
def test_an_upward_import_is_caught(module, code):
    assert len(violations(code, module)) == 1


@pytest.mark.parametrize("module, code", [
    ("advbct.engine.trainer", "from advbct.evaluation.protocol import evaluate_models\n"),
    ("advbct.evaluation.evaluate", "from advbct.models import load_trained_model\nfrom . import backfill\n"),
    ("advbct.losses.base", "from advbct.meta import ClassMeta\nfrom advbct import distributed as dist\n"),
    ("advbct.world", "if __name__ == '__main__':\n    from advbct.cli import guarded\n"),
    ("advbct.config", "from advbct.losses.registry import config_section\n"),
    ("advbct.models", "from advbct.models.loading import load_trained_model\n"),
])
def test_a_downward_import_passes(module, code):
    assert violations(code, module, is_package=module == "advbct.models") == []
