"""What each `precision=` choice means: Lightning's precision flag, TF32 switches, autocast dtype. A plain
config value, not a config group: Hydra's command line parses `precision=16` as an int, no group choice."""

import statistics
import timeit

import torch

from lightning_seg.errors import ConfigError

# the one table: choice -> (Trainer precision, TF32 for fp32 convolutions and matmuls, name in reports)
PRECISIONS = {
    "32": ("32-true", False, "fp32"),  # true fp32: PyTorch would otherwise run convolutions in TF32
    "tf32": ("32-true", True, "TF32"),
    "16": ("16-mixed", False, "fp16 AMP"),  # fp16 autocast with loss scaling (Lightning runs bf16 on CPU)
    "bf16": ("bf16-mixed", False, "bf16 AMP"),
}
AUTO = "auto"  # measured by training at start-up: lightning_seg.study.auto_precision


def _lookup(choice) -> tuple[str, bool, str]:
    if str(choice) in PRECISIONS:
        return PRECISIONS[str(choice)]
    choices = ", ".join(PRECISIONS)
    if str(choice) == AUTO:  # only training resolves it, before anything reads the table
        raise ConfigError(f"precision=auto is chosen by training at start-up; here name one of {choices}")
    raise ConfigError(f"precision={choice}: choose one of {choices}, or auto (training)")


def trainer_precision(choice) -> str:
    return _lookup(choice)[0]


def uses_tf32(choice) -> bool:
    return _lookup(choice)[1]


def choice_of(trainer_mode: str) -> str:
    """The `precision=` choice of a Trainer's precision flag (fp32 for 32-true, whatever TF32 says)."""
    return next(c for c, (mode, _, _) in PRECISIONS.items() if mode == trainer_mode)


def label(choice) -> str:
    """The name tables and plots show (an unknown choice as given)."""
    return PRECISIONS[str(choice)][2] if str(choice) in PRECISIONS else str(choice)


def set_tf32(enabled: bool) -> None:
    """TF32 for cuDNN convolutions and CUDA matmuls, on or off: PyTorch's default turns it on for
    convolutions, so an unset flag makes "fp32" numbers quietly TF32 ones."""
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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16, AMX). Without them bf16 3D convolutions
    fall back to a generic kernel that is 10-40x slower than fp32 (issue 22: 43x for one Conv3d).
    torch has no public query for it (2.10 to 2.14 checked); this private one has kept its name since 1.x."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_conv_slowdown(repeats: int = 3) -> float:
    """Time of a small Conv3d forward under CPU bf16 autocast over fp32 (medians; under a second in all)."""
    conv, x = torch.nn.Conv3d(8, 8, 3, padding=1), torch.randn(1, 8, 16, 16, 16)

    def seconds(enabled: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            conv(x)  # warms the kernel up
            return statistics.median(timeit.repeat(lambda: conv(x), number=1, repeat=repeats))

    return seconds(True) / max(seconds(False), 1e-9)


def fast_inference_precision(choice, device: torch.device) -> tuple[str, str | None]:
    """The precision validation and prediction run in, and the log line saying why it is not `choice`."""
    choice = str(choice)
    if device.type != "cpu" or autocast_dtype(choice, device) != torch.bfloat16 or cpu_has_native_bf16():
        return choice, None
    ratio = bf16_conv_slowdown()
    return "32", (
        f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16: a bf16 3D convolution "
        f"takes {ratio:.1f}x as long as in fp32 here; validation and prediction run in fp32 "
        "(precision=32 trains in fp32 too)"
    )
