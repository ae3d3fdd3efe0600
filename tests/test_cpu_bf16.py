"""oneDNN's bf16 Conv3d weight gradient on CPUs without AMX, worked around (docs/benchmarks/bf16_cpu_nan.md):
convolutions over inputs smaller than their kernel run in fp32 under CPU bf16 autocast, the others in bf16."""

import os
import subprocess
import sys

import torch

from lightning_seg.model.cpu_bf16 import PaddingSafeConv3d, fp32_where_bf16_conv_fails
from lightning_seg.model.nets import basic_unet

from .conftest import ROOT

# the reproduction: the heap holds NaN bit patterns, as a long training process's may; oneDNN's jit_bf16
# kernels (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 selects them on a CPU with AMX too) read them into the gradient
REPRODUCTION = """
import torch
from lightning_seg.model.cpu_bf16 import fp32_where_bf16_conv_fails
torch.manual_seed(0)
conv = fp32_where_bf16_conv_fails(torch.nn.Conv3d(32, 64, 3, padding=1))  # without: 60 of 100 tries fail
x, g = torch.randn(2, 32, 2, 2, 2), torch.randn(2, 64, 2, 2, 2)
bad = 0
for _ in range(40):
    junk = [torch.full((n,), float("nan")) for n in (1000, 5000, 20000, 60000)]
    del junk
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.backward(g.to(y.dtype))
    bad += not bool(torch.isfinite(conv.weight.grad).all())
print(bad)
"""


def test_the_bottleneck_convolution_runs_in_fp32_and_its_weight_gradient_stays_finite():
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    command = [sys.executable, "-c", REPRODUCTION]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "0"  # of 40 tries, none with a non-finite weight gradient


def test_only_convolutions_over_inputs_smaller_than_the_kernel_leave_bf16():
    torch.manual_seed(0)
    plain = torch.nn.Conv3d(8, 16, 3, padding=1)
    safe = fp32_where_bf16_conv_fails(torch.nn.Conv3d(8, 16, 3, padding=1))
    safe.load_state_dict(plain.state_dict())
    for size, dtype in ((2, torch.float32), (4, torch.bfloat16)):
        x = torch.randn(2, 8, size, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = safe(x)
        assert out.dtype == dtype
        out.float().sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            plain(x).float().sum().backward()
        assert torch.allclose(safe.weight.grad, plain.weight.grad, rtol=1e-2, atol=1e-2)
        safe.weight.grad = plain.weight.grad = None
    assert safe(torch.randn(1, 8, 2, 2, 2)).dtype == torch.float32  # no autocast: as plain Conv3d


def test_a_network_keeps_its_parameters_and_checkpoint_keys():
    net = basic_unet(1, 3, [32, 32, 32], width=4)
    keys, parameters = list(net.state_dict()), list(net.parameters())
    fp32_where_bf16_conv_fails(net)
    assert list(net.state_dict()) == keys and list(net.parameters()) == parameters
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is PaddingSafeConv3d for m in convs)
    # transposed convolutions are another kernel, untouched
    assert any(isinstance(m, torch.nn.ConvTranspose3d) for m in net.modules())
