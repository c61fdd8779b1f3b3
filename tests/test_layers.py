"""Imports run one way: cli -> experiments -> train -> (optim | data | models) -> base.

Read from the source with ast, lazy imports inside functions included, so a layer that reaches up
or an import cycle fails here before anyone trips over it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "torch_agd"

# The layering, lowest first. A module may import its own part and any part of a lower layer; a
# part of the same layer is a sibling it must not import (AGD knows nothing of models or data).
LAYERS = (
    ("base",),                     # errors.py, atomic.py: the standard library only
    ("optim", "data", "models"),   # the library: the AGD package (torch_agd/optim/), datasets, networks
    ("train", "integrations"),     # agd train, and AGD inside other trainers (torchtitan): use the library
    ("experiments",),              # sweeps, figures, results page: use the trainer, never the reverse
    ("cli",),                      # agd train | sweep | plot
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# The top-level modules; a new loose torch_agd/*.py belongs to no layer until it is named here.
TOP_LEVEL = {"errors": "base", "atomic": "base", "cli": "cli", "__main__": "cli"}
ROOT = "torch_agd"  # its __init__ only re-exports; an import of a name from it is one of the module that defines it


def part_of(module: str, root: Path = PACKAGE) -> str:
    """'torch_agd.train.run' -> 'train'; 'torch_agd.optim.rules' -> 'optim'; 'torch_agd.errors' -> 'base'."""
    first = module.split(".")[1]
    if (root / first).is_dir():
        return first
    return TOP_LEVEL.get(first, f"unlayered top-level module {first}")


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, name: str) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _reexports(root: Path) -> dict[str, str]:
    """Names that the package's __init__ imports from its submodules: name -> module."""
    found = {}
    for node in ast.walk(ast.parse((root / "__init__.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.update({alias.name: f"{ROOT}.{node.module}" for alias in node.names})
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package -> the modules of the package it imports."""
    reexports = _reexports(root)
    graph = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(root, path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if _is_module(root, full):
                    targets.add(full)
                elif base == ROOT:
                    targets.add(reexports.get(alias.name, ROOT))
                else:
                    targets.add(base)
        graph[name] = {t for t in targets if t.split(".")[0] == ROOT and t != ROOT and t != name}
    return graph


def upward_imports(graph: dict[str, set[str]], root: Path = PACKAGE) -> list[str]:
    """'a -> b' for every import from a part into a higher layer or a sibling part (or a part
    that is in no layer)."""
    bad = []
    for module, targets in graph.items():
        if module == ROOT:
            continue
        for target in sorted(targets):
            src, dst = part_of(module, root), part_of(target, root)
            if src != dst and RANK.get(dst, len(LAYERS)) >= RANK.get(src, -1):
                bad.append(f"{module} ({src}) -> {target} ({dst})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles between modules, each as the path that closes it."""
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    assert {part_of(m) for m in graph if m != ROOT} <= set(RANK)
    assert "torch_agd.train.run" in graph and "torch_agd.experiments.results" in graph


def test_no_module_imports_one_above_it_or_beside_it():
    assert upward_imports(import_graph()) == []


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_find_an_upward_import_a_sibling_import_and_a_cycle(tmp_path):
    root = tmp_path / ROOT
    files = {
        "__init__.py": "from .optim import AGD\n__version__ = '0'\n",
        "errors.py": "",
        "optim/__init__.py": "from .. import errors\n",
        "data/__init__.py": "from .. import __version__\nfrom torch_agd import AGD\n",
        "train/__init__.py": "",
        "train/config.py": "def f():\n    from torch_agd.experiments import runs\n",
        "experiments/__init__.py": "",
        "experiments/plot.py": "from torch_agd.experiments.results import x\n",
        "experiments/results.py": "from torch_agd.experiments import plot\n",
        "experiments/runs.py": "from torch_agd.train import config\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["torch_agd.data"] == {"torch_agd.optim"}  # __version__ is the root's own name
    assert upward_imports(graph, root) == [
        "torch_agd.data (data) -> torch_agd.optim (optim)",
        "torch_agd.train.config (train) -> torch_agd.experiments.runs (experiments)",
    ]
    assert sorted(map(tuple, cycles(graph))) == [
        ("torch_agd.experiments.plot", "torch_agd.experiments.results", "torch_agd.experiments.plot"),
        ("torch_agd.experiments.runs", "torch_agd.train.config", "torch_agd.experiments.runs"),
    ]


def test_the_optimizer_package_needs_only_itself_torch_and_the_errors():
    graph = import_graph()
    optim = {m: targets for m, targets in graph.items() if m != ROOT and part_of(m) == "optim"}
    assert "torch_agd.optim.optimizer" in optim and "torch_agd.optim.rules" in optim and len(optim) >= 10
    outside = {t for targets in optim.values() for t in targets if part_of(t) != "optim"}
    assert outside == {"torch_agd.errors"}


def test_a_loose_top_level_module_belongs_to_no_layer(tmp_path):
    root = tmp_path / ROOT
    (root / "optim").mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "stray.py", "optim/__init__.py"):
        (root / name).write_text("")
    parts = {m: part_of(m, root) for m in import_graph(root) if m != ROOT}
    assert parts["torch_agd.optim"] == "optim" and parts["torch_agd.errors"] == "base"
    assert parts["torch_agd.stray"] not in RANK
