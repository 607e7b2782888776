"""Imports run one way: foundations <- core <- families <- cli/recipes (issue 10, section 4).

Every `import` / `from ... import` in saft_hf/**/*.py (module level and inside functions) is read
with `ast`; a module may import only its own layer or lower ones. `analysis` never imports `demo`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saft_hf"

# top-level name under saft_hf -> layer (0 = foundations ... 3 = command line)
LAYERS = {
    "args": 0, "argument_checks": 0, "recipe_args": 0, "sharpness": 0, "io_utils": 0, "model_paths": 0,
    "metrics": 0, "heads": 0, "sam_variants": 0, "stats": 0, "live_taskvector": 0,
    "trainer": 1, "merging": 1, "finetuning": 1, "evaluation": 1, "analysis": 1, "pools": 1, "callbacks": 1,
    "wrap": 1, "trl": 1, "fsdp2": 1,
    "demo": 2, "vision": 2, "glue": 2, "tasks": 2, "testing": 2,
    "cli": 3, "commands": 3,
}
_ROOT_EXPORTS = {name: module for name, module in __import__("saft_hf")._LAZY.items()}
FAMILIES = {name for name, layer in LAYERS.items() if layer == 2}


def _component(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def _imported_components(source: str, rel: Path) -> list[tuple[int, str]]:
    """(line, saft_hf top-level component) of every saft_hf import in a file at saft_hf/`rel`,
    relative imports resolved."""
    tree = ast.parse(source, filename=str(rel))
    package_parts = ["saft_hf", *rel.parts[:-1]]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module]
            if module == "saft_hf":  # from saft_hf import demo / SAFTTrainer (a lazy re-export)
                names = [_ROOT_EXPORTS.get(alias.name, f"saft_hf.{alias.name}") for alias in node.names
                         if alias.name != "__version__"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "saft_hf" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def _file_violations(source: str, rel: Path) -> list[str]:
    own = _component(rel)
    assert own in LAYERS, f"saft_hf/{rel}: top-level module {own!r} has no layer; add it to LAYERS"
    out = []
    for line, other in _imported_components(source, rel):
        if other == own:
            continue
        assert other in LAYERS, f"saft_hf/{rel}:{line} imports saft_hf.{other}, which has no layer"
        if LAYERS[other] > LAYERS[own]:
            out.append(f"saft_hf/{rel}:{line} ({own}, layer {LAYERS[own]}) imports saft_hf.{other} "
                       f"(layer {LAYERS[other]})")
        if own == "analysis" and other == "demo":
            out.append(f"saft_hf/{rel}:{line}: analysis imports demo")
    return out


def _violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue  # the package root only re-exports lazily
        out += _file_violations(path.read_text(), rel)
    return out


def test_imports_run_one_way():
    assert _violations() == []


def test_core_names_no_family_even_by_string():
    # importlib.import_module("saft_hf.demo...") would dodge the ast check: core modules must not
    # mention a family module path at all (docstrings included would be noise, so only code strings).
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if LAYERS.get(_component(path.relative_to(PACKAGE))) != 1:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if any(node.value.startswith(f"saft_hf.{fam}") for fam in FAMILIES):
                    offenders.append(f"{path}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_the_checker_catches_upward_imports():
    bad = _file_violations("def f():\n    from saft_hf.demo import study\n", Path("evaluation/x.py"))
    assert len(bad) == 1 and "imports saft_hf.demo" in bad[0]
    assert len(_file_violations("from ..demo import model\n", Path("analysis/y.py"))) == 2  # upward + analysis->demo
    assert _file_violations("from saft_hf import SAFTTrainer\n", Path("demo/z.py")) == []  # family -> core
    assert _file_violations("from saft_hf import SAFTTrainer\n", Path("heads.py")) != []  # foundation -> core


@pytest.mark.parametrize("module", ["saft_hf.demo.family", "saft_hf.vision.family", "saft_hf.glue.family"])
def test_every_family_exposes_the_cli_hooks(module):
    import importlib

    mod = importlib.import_module(module)
    for name in ("add_analyze_arguments", "build_probe", "task_pool", "model_pool"):
        assert callable(getattr(mod, name)), f"{module} lacks {name}"
