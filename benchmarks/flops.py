"""FLOPs of a network call, counted by torch.utils.flop_counter.FlopCounterMode on the real module.

FlopCounterMode intercepts aten ops and applies per-op formulas: 2*M*N*K for matmuls (one multiply + one
add per MAC), 2 x output elements x (C_in/groups x kernel area) for convolutions, and the two matmuls of
scaled_dot_product_attention (QK^T and AV). Elementwise ops, norms and softmax are not counted: they are
memory-bound and a few % of the total for these networks, so "ideal time" = FLOPs / peak tensor throughput
is a lower bound that ignores them. Counting runs the module once (on a meta device when possible).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) fp16/bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets.
PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def count_flops(module: torch.nn.Module, args: Sequence[torch.Tensor], **kwargs: object) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def peak_tflops(device_name: str) -> float | None:
    """The peak for a torch.cuda.get_device_name(), longest matching key first; None when unknown."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None
