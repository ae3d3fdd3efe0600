"""What every run records (versions, GPU, CPU, effective TF32 flags), and its torch / cuDNN's problems."""

import os
import platform

import monai
import pytorch_lightning as pl
import torch

from lightning_seg.precision import cpu_has_native_bf16


def environment_info() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.fp32_precision,
        "tf32_cudnn_conv": torch.backends.cudnn.conv.fp32_precision,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "lightning": pl.__version__,
        "monai": monai.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # AVX2 / AVX512 / ...; native bf16 decides whether bf16 autocast is fast or a slow fallback here
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
    }


def known_problems(env: dict, precision: str) -> list[str]:
    """The published 3D-convolution bugs of this torch / cuDNN a run at `precision` meets, one line each."""
    problems = []
    precision = str(precision)
    cudnn = env.get("cudnn")
    if env["torch"].split("+")[0] == "2.9.0" and precision in ("16", "bf16"):
        problems.append(
            "torch 2.9.0 runs 3D convolutions under autocast about 4x slower than 2.8 "
            "(pytorch/pytorch#166122): install torch 2.9.1 or newer"
        )
    if cudnn and 90800 <= cudnn < 91100 and precision == "bf16":
        problems.append(
            f"cuDNN {cudnn} (9.8-9.10) can compute bf16 3D convolutions wrongly (pytorch/pytorch#163539): "
            "use precision=16, or a torch build with cuDNN 9.11 or newer"
        )
    if env["torch"].startswith("2.9.") and cudnn and cudnn < 91500 and precision == "bf16":
        problems.append(
            f"torch 2.9 with cuDNN {cudnn} (before 9.15) needs several times the memory for bf16 3D "
            "convolutions (pytorch/pytorch#166643): install cuDNN 9.15 or newer (pip nvidia-cudnn-cu12)"
        )
    return problems
