"""The board never imports host code: a static walk of the import graph from every board-side module.

Board side: ``rkedge.runtime``, ``rkedge.boards`` and the ground package (the modules directly in ``rkedge/``).
Host side: ``rkedge.convert`` and ``rkedge.lora`` (torch, transformers, the toolkit). The walk reads the source
files (AST, nothing is imported), follows ``import``/``from`` statements wherever they are (inside functions
too), resolves relative imports, adds the parent packages Python runs first, and follows the module names held in
strings (the lazy-import tables of ``rkedge.runtime`` and ``rkedge.runtime.abi``), to any depth.
"""

from __future__ import annotations

import ast
import os
import re
from collections import deque
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "rkedge"
HOST = ("rkedge.convert", "rkedge.lora")
#: The ``rkedge`` command group mounts every side's commands, the host ones only when they are installed
#: (``rkedge/cli.py`` guards them with ImportError); it is the one place allowed to name both sides.
COMPOSITION_ROOTS = {"rkedge.cli", "rkedge.__main__"}
_MODULE_NAME = re.compile(r"rkedge(\.[A-Za-z_]\w*)+")


def module_files(package_dir: Path, package: str = "rkedge") -> dict[str, Path]:
    """Every module below ``package_dir`` by its dotted name (the subpackages are symlinks: followed)."""
    modules: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(package_dir, followlinks=True):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]
        parts = [package, *Path(folder).relative_to(package_dir).parts]
        for file in files:
            if file.endswith(".py"):
                modules[".".join(parts if file == "__init__.py" else [*parts, file[:-3]])] = Path(folder) / file
    return modules


class ImportGraph:
    def __init__(self, modules: dict[str, Path], sources: dict[str, str] | None = None) -> None:
        self.modules = modules
        self.sources = sources or {}  # replacement source text by module name (for the self-tests)

    def _is_package(self, name: str) -> bool:
        return self.modules[name].name == "__init__.py"

    def _source(self, name: str) -> str:
        return self.sources[name] if name in self.sources else self.modules[name].read_text(encoding="utf-8")

    def imports_of(self, name: str) -> set[str]:
        """The modules ``name`` imports anywhere in its body, plus the parent packages of each."""
        tree = ast.parse(self._source(name))
        package = name if self._is_package(name) else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                found.add(base)
                # ``from pkg import sub`` imports the submodule when there is one.
                found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in self.modules}
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and _MODULE_NAME.fullmatch(node.value) \
                    and (node.value in self.modules or node.value.startswith(HOST)):
                found.add(node.value)  # importlib.import_module("rkedge....") tables
        targets = {t for t in found if t == "rkedge" or t.startswith("rkedge.")}
        targets.add(name)  # importing a module runs its packages' __init__ first
        return {parent for t in targets for parent in _parents(t)} - {name}

    def host_chains(self, roots: list[str]) -> list[list[str]]:
        """For each host module reachable from ``roots``, one shortest chain that reaches it."""
        chains: list[list[str]] = []
        reached: set[str] = set()
        for root in roots:
            previous: dict[str, str | None] = {root: None}
            queue = deque([root])
            while queue:
                current = queue.popleft()
                if _is_host(current):
                    if current not in reached:
                        reached.add(current)
                        chain: list[str] = []
                        step: str | None = current
                        while step is not None:
                            chain.append(step)
                            step = previous[step]
                        chains.append(chain[::-1])
                    continue
                if current not in self.modules:
                    continue  # a name that is not a module (an attribute imported with from ... import)
                for target in sorted(self.imports_of(current)):
                    if target not in previous:
                        previous[target] = current
                        queue.append(target)
        return chains


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_host(name: str) -> bool:
    return any(name == host or name.startswith(host + ".") for host in HOST)


def board_side(modules: dict[str, Path]) -> list[str]:
    ground = [n for n in modules if n.count(".") == 1 and not _is_host(n) and n not in ("rkedge.runtime", "rkedge.boards")]
    board = [n for n in modules if n == "rkedge" or n.startswith(("rkedge.runtime", "rkedge.boards"))]
    return sorted(set(ground + board) - COMPOSITION_ROOTS)


def render(chains: list[list[str]]) -> str:
    return "\n".join(" -> ".join(chain) for chain in chains)


def test_the_board_side_never_imports_host_code() -> None:
    modules = module_files(PACKAGE_DIR)
    roots = board_side(modules)
    assert "rkedge.runtime.doctor" in roots and "rkedge.boards" in roots and "rkedge.failures" in roots
    assert "rkedge.convert.plan" not in roots
    chains = ImportGraph(modules).host_chains(roots)
    assert chains == [], "board-side modules import host code:\n" + render(chains)


def test_the_old_doctor_import_would_be_caught() -> None:
    """doctor used to import ``rkedge.convert.inspect`` inside a function; the walk finds that, and a host import
    two modules away (doctor -> rkedge.versions -> rkedge.convert.rules)."""
    modules = module_files(PACKAGE_DIR)
    doctor = modules["rkedge.runtime.doctor"].read_text(encoding="utf-8")
    in_a_function = doctor + "\n\ndef _trailer(model):\n    from rkedge.convert.inspect import inspect_rkllm\n"
    chains = ImportGraph(modules, {"rkedge.runtime.doctor": in_a_function}).host_chains(["rkedge.runtime.doctor"])
    assert ["rkedge.runtime.doctor", "rkedge.convert"] in chains
    assert ["rkedge.runtime.doctor", "rkedge.convert.inspect"] in chains

    versions = modules["rkedge.versions"].read_text(encoding="utf-8") + "\nfrom rkedge.convert import rules\n"
    chains = ImportGraph(modules, {"rkedge.versions": versions}).host_chains(["rkedge.runtime.doctor"])
    assert ["rkedge.runtime.doctor", "rkedge.versions", "rkedge.convert.rules"] in chains, render(chains)


def test_relative_imports_lazy_tables_and_depth(tmp_path: Path) -> None:
    """A synthetic package: relative imports inside functions, a parent package's __init__, a string table."""
    files = {
        "__init__.py": "",
        "ground.py": "def g():\n    import rkedge.lora.merge\n",
        "runtime/__init__.py": "TABLE = {'thing': 'rkedge.runtime.lazy'}\n",
        "runtime/a.py": "def f():\n    from . import b\n",
        "runtime/b.py": "from .. import ground\n",
        "runtime/lazy.py": "from rkedge.convert.rules import version_key\n",
        "runtime/sub/__init__.py": "from ...ground import g\n",
        "runtime/sub/c.py": "x = 1\n",
        "convert/__init__.py": "",
        "convert/rules.py": "",
        "lora/__init__.py": "",
        "lora/merge.py": "",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    modules = module_files(tmp_path)
    graph = ImportGraph(modules)
    assert render(graph.host_chains(["rkedge.runtime.a"])) == "\n".join([
        "rkedge.runtime.a -> rkedge.runtime -> rkedge.runtime.lazy -> rkedge.convert",
        "rkedge.runtime.a -> rkedge.runtime -> rkedge.runtime.lazy -> rkedge.convert.rules",
        "rkedge.runtime.a -> rkedge.runtime.b -> rkedge.ground -> rkedge.lora",
        "rkedge.runtime.a -> rkedge.runtime.b -> rkedge.ground -> rkedge.lora.merge",
    ])
    # A plain module two levels down still runs its packages' __init__ (and so reaches the lazy table).
    assert graph.host_chains(["rkedge.runtime.sub.c"])[0][:2] == ["rkedge.runtime.sub.c", "rkedge.runtime"]
    (tmp_path / "runtime" / "lazy.py").write_text("x = 'rkedge convert (a message, not a module)'\n")
    (tmp_path / "ground.py").write_text("")
    assert ImportGraph(module_files(tmp_path)).host_chains(["rkedge.runtime.a", "rkedge.runtime.sub.c"]) == []
