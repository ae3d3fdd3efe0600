"""The two floors: the core never imports the study, and nothing the project ships points outside it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_seg"
STUDY = PACKAGE / "study"


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


def test_no_import_arrow_runs_from_the_core_to_the_study():
    core = [p for p in PACKAGE.rglob("*.py") if STUDY not in p.parents]
    assert len(core) > 20
    arrows = {
        str(p.relative_to(ROOT)): sorted(
            m for m in imported_modules(p) if m.startswith("lightning_seg.study")
        )
        for p in core
    }
    assert {k: v for k, v in arrows.items() if v} == {}


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
