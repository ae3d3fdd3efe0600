"""What each `precision=` choice means: Lightning's precision flag, TF32 switches, autocast dtype.

A plain config value rather than a config group: Hydra's command line parses `precision=16`
as an integer, which it refuses as a group choice.
"""

import torch

from lightning_seg.errors import ConfigError

# the one table: choice -> (Trainer precision, TF32 for fp32 convolutions and matmuls, name in reports)
PRECISIONS = {
    "32": ("32-true", False, "fp32"),  # true fp32: PyTorch would otherwise run convolutions in TF32
    "tf32": ("32-true", True, "TF32"),
    "16": ("16-mixed", False, "fp16 AMP"),  # fp16 autocast with loss scaling (Lightning runs bf16 on CPU)
    "bf16": ("bf16-mixed", False, "bf16 AMP"),
}


def _lookup(choice) -> tuple[str, bool, str]:
    try:
        return PRECISIONS[str(choice)]
    except KeyError:
        raise ConfigError(f"precision={choice}: choose one of {', '.join(PRECISIONS)}") from None


def trainer_precision(choice) -> str:
    return _lookup(choice)[0]


def uses_tf32(choice) -> bool:
    return _lookup(choice)[1]


def label(choice) -> str:
    """The name tables and plots show (an unknown choice as given)."""
    return PRECISIONS[str(choice)][2] if str(choice) in PRECISIONS else str(choice)


def set_tf32(enabled: bool) -> None:
    """TF32 for cuDNN convolutions and CUDA matmuls, on or off. PyTorch's default turns it on
    for convolutions, so an unset flag makes "fp32" numbers quietly TF32 ones."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def autocast(choice, device: torch.device) -> torch.autocast:
    """The autocast context a precision choice trains under (a disabled one for fp32/TF32)."""
    dtype = autocast_dtype(choice, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def autocast_dtype(choice, device: torch.device) -> torch.dtype | None:
    """The autocast dtype Lightning uses for a choice (16-mixed is bf16 on CPU), None for fp32."""
    mode = trainer_precision(choice)
    if mode == "16-mixed":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.bfloat16 if mode == "bf16-mixed" else None
