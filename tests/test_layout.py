"""The floors: the core never imports the study or the task planner above it, the study never imports
the planner, and nothing the project ships points outside the repository."""

import ast
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
