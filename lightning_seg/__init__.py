"""lightning_seg: 3D medical image segmentation on MSD tasks with Lightning, Hydra and MONAI."""

from lightning_seg import config as _config  # noqa: F401  (registers the OmegaConf resolvers)

__version__ = "0.1.0"
