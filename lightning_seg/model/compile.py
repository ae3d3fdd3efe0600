"""Can torch.compile run here? Checked up front so an unusable compiler means eager, not a crash."""

import shutil

import torch


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device`, or None when it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (pip install triton)"
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "no C++ compiler found for Inductor's CPU kernels"
    return None
