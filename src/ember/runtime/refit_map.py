"""Which ONNX initializer holds each weight of the source module: what refitting an engine by state-dict
name needs (LoRA deltas arrive as diffusers state-dict keys; TensorRT's refitter knows ONNX names).

The TorchScript exporter keeps parameter names for weights used as they are ("unet.conv_in.weight"), but
constant folding turns a Linear's weight into a transposed constant with a generated name
("onnx::MatMul_1234"). Those are matched by content: the exact bytes of the weight or of its transpose.
Pure CPU (onnx + torch); the map is written next to the engines as refit_map.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + str(array.shape)


def refit_name_map(onnx_path: Path, wrapper: nn.Module) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Map each state-dict key of the wrapped diffusers component to its ONNX initializer.

    Returns (map, unmatched): map[key] = {"onnx": name, "transpose": bool}; `unmatched` lists keys with no
    initializer (folded into other constants) or several identical candidates (ambiguous: refitting one
    copy would be wrong). Those cannot be refit by name; LoRA targets attention/linear weights, which match.
    """
    ((prefix, component),) = wrapper.named_children()  # each spec wrapper holds one diffusers module
    model = onnx.load(str(onnx_path), load_external_data=True)
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    state = component.state_dict()
    # Initializers that carry a parameter's own name belong to it; only the rest are matched by content.
    named = {f"{prefix}.{key}" for key in state}
    by_content: dict[str, list[str]] = {}
    for name, array in initializers.items():
        if name not in named and array.dtype.kind == "f" and array.size > 1:
            by_content.setdefault(_digest(array.astype(np.float32)), []).append(name)

    mapping: dict[str, dict[str, Any]] = {}
    unmatched: list[str] = []
    for key, tensor in state.items():
        if f"{prefix}.{key}" in initializers:
            mapping[key] = {"onnx": f"{prefix}.{key}", "transpose": False}
            continue
        value = tensor.detach().to(torch.float32).cpu().numpy()
        candidates = [(name, False) for name in by_content.get(_digest(value), [])]
        if value.ndim == 2:
            candidates += [(name, True) for name in by_content.get(_digest(value.T), [])]
        if len(candidates) == 1:
            name, transpose = candidates[0]
            mapping[key] = {"onnx": name, "transpose": transpose}
        else:
            unmatched.append(key)
    return mapping, unmatched
