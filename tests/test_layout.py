"""The floors: the core never imports the study or the task planner above it, the study never imports
the planner, and nothing the project ships points outside the repository."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_seg"
STUDY = PACKAGE / "study"
PLANNER = PACKAGE / "new_task"  # lightning-seg-new-task: sizes patches with the study's memory planner


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names (relative imports resolved to absolute ones)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def upward_arrows(files: list[Path], floors_above: tuple[str, ...]) -> dict[str, list[str]]:
    arrows = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith(floors_above))
        for p in files
    }
    return {k: v for k, v in arrows.items() if v}


def test_no_import_arrow_runs_down_to_up():
    core = [p for p in PACKAGE.rglob("*.py") if STUDY not in p.parents and PLANNER not in p.parents]
    assert len(core) > 20
    assert upward_arrows(core, ("lightning_seg.study", "lightning_seg.new_task")) == {}
    assert upward_arrows(list(STUDY.rglob("*.py")), ("lightning_seg.new_task",)) == {}


def test_the_acceptance_run_is_not_part_of_the_package():
    assert not list(PACKAGE.rglob("gpu_check*"))
    for path in PACKAGE.rglob("*.py"):
        assert not any(m.startswith("acceptance") for m in imported_modules(path)), path


def test_nothing_shipped_points_outside_the_repository():
    # tests may read real data from ../shared (skipping where it is absent); nothing else may need it
    shipped = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in ("lightning_seg", "conf", "docs", "acceptance", "notebooks"):
        shipped += [
            p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix not in (".png", ".ckpt")
        ]
    offending = [str(p.relative_to(ROOT)) for p in shipped if "shared/" in p.read_text(errors="ignore")]
    assert offending == []


def test_no_function_of_the_package_is_longer_than_50_lines():
    """A function that does one named thing fits a screen (issue 31); split it into named steps."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in (ROOT / "lightning_seg").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 50
    ]
    assert long == []


LIGHTNING = ("pytorch_lightning", "lightning_fabric", "lightning")
# objects of Lightning's whose underscored members are its internals, not ours
LIGHTNING_OBJECTS = {"trainer", "pl_module", "strategy", "fit", "fit_loop", "epoch_loop", "checkpoint_io"}


def _private(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")


def inherited_privates(cls: ast.ClassDef) -> list[ast.Attribute]:
    """`self._x` in a subclass where the class itself neither defines nor assigns `_x`: its base's."""
    if not cls.bases:
        return []
    own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    own |= {
        t.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign | ast.Assign)
        for t in ast.walk(n)
        if isinstance(t, ast.Name)
    }
    selfs = [n for n in ast.walk(cls) if _private(n) and getattr(n.value, "id", None) == "self"]
    own |= {n.attr for n in selfs if isinstance(n.ctx, ast.Store)}
    return [n for n in selfs if n.attr not in own]


def lightning_private_uses(path: Path) -> list[str]:
    """Lightning internals a file uses: underscored names imported from it, reached on its objects, called on
    `super()` or inherited by a subclass, and profiler actions naming its private loops."""
    tree, found = ast.parse(path.read_text()), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(LIGHTNING):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("_")]
        elif _private(node):
            owner = node.value
            on_super = isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super"
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if on_super or name in LIGHTNING_OBJECTS:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
        elif isinstance(node, ast.ClassDef):
            found += [f"{ast.unparse(n)} (line {n.lineno})" for n in inherited_privates(node)]
        elif isinstance(node, ast.Constant) and re.search(r"\[_[A-Z]\w*\]", str(node.value)):
            found.append(f"{node.value!r} (line {node.lineno})")  # a profiler action naming a private loop
    return found


def test_lightning_internals_are_used_at_most_twice_each_said_why():
    """Lightning's private members break forks at a minor release (issue 31): public APIs, else at most two
    internals, each with a comment that says why and which versions were checked."""
    uses = {
        str(p.relative_to(ROOT)): found for p in PACKAGE.rglob("*.py") if (found := lightning_private_uses(p))
    }
    assert sum(map(len, uses.values())) <= 2, uses
    for path in uses:
        assert "checked" in (ROOT / path).read_text(), f"{path}: say which Lightning versions were checked"
