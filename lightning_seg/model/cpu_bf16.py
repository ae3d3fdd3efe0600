"""A workaround for oneDNN's bf16 3D-convolution weight gradient on CPUs (docs/benchmarks/bf16_cpu_nan.md).

oneDNN 3.12 (torch 2.13) computes the weight gradient of a bf16 Conv3d with its `jit_bf16` kernels on CPUs
without AMX (AMD Zen 4/5, Intel before Sapphire Rapids); where a feature map is smaller than the kernel
(a U-Net's 2x2x2 bottleneck under a 3x3x3 kernel) that kernel returns blocks of garbage, NaN where the
memory it reads held NaN bit patterns: the intermittent divergence of CPU bf16 training. Those
convolutions run in fp32 here; they are the network's smallest, so bf16 keeps its speed."""

import torch
from torch import nn


class PaddingSafeConv3d(nn.Conv3d):
    """Conv3d that runs in fp32 under CPU bf16 autocast where an input is smaller than the kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        small = any(n < k for n, k in zip(input.shape[2:], self.kernel_size, strict=True))
        if small and input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)


def fp32_where_bf16_conv_fails(net: nn.Module) -> nn.Module:
    """`net` with each plain Conv3d made a PaddingSafeConv3d, in place: the same parameters and state dict."""
    for module in net.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = PaddingSafeConv3d
    return net
