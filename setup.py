"""The one part of the package layout pyproject.toml cannot state: conf/ stays at the top of the
checkout, where Hydra users look for it, and ships inside the wheel as lightning_seg/conf with every
config group (each group folder is a package to setuptools, so the list is computed here)."""

from pathlib import Path

from setuptools import find_packages, setup

CONF = Path(__file__).parent / "conf"
conf_packages = {
    ".".join(("lightning_seg.conf", *path.parent.relative_to(CONF).parts)) for path in CONF.rglob("*.yaml")
}
setup(
    packages=find_packages(include=["lightning_seg*"]) + sorted(conf_packages),
    package_dir={"lightning_seg.conf": "conf"},
    package_data={"lightning_seg.conf": ["*.yaml"], **{name: ["*.yaml"] for name in conf_packages}},
)
