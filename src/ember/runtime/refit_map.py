"""Which ONNX initializer holds each weight of the source module: what refitting an engine by state-dict
name needs (LoRA deltas arrive as diffusers state-dict keys; TensorRT's refitter knows ONNX names).

The TorchScript exporter keeps parameter names for weights used as they are ("unet.conv_in.weight"), but
constant folding turns a Linear's weight into a transposed constant with a generated name
("onnx::MatMul_1234"). Those are matched by content: the exact bytes of the weight or of its transpose.
Pure CPU (onnx + torch). The map is computed once, at export time, from the module just exported, and
written next to the .onnx as `<network>.refit.json`: serving (ONNX Runtime initializer overrides, TensorRT's
Refitter, which names weights after the ONNX initializers it parsed) reads it and never needs the torch module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo
from torch import nn

from ember.specs.artifacts import REFIT_MAP_VERSION  # bump there: part of the artifacts key


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + str(array.shape)


def refit_name_map(onnx_path: Path, wrapper: nn.Module) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Map each state-dict key of the wrapped diffusers component to its ONNX initializer.

    Returns (map, unmatched): map[key] = {"onnx": name, "transpose": bool}; `unmatched` lists keys with no
    initializer (folded into other constants) or several identical candidates (ambiguous: refitting one
    copy would be wrong). Those cannot be refit by name; LoRA targets attention/linear weights, which match.
    """
    children = list(wrapper.named_children())
    # A spec wrapper usually holds one diffusers module, whose own state-dict names LoRA files use; a
    # wrapper of several (e.g. a VAE decoder + post_quant_conv) is keyed by the wrapper's names.
    prefix, component = children[0] if len(children) == 1 else ("", wrapper)
    model = onnx.load(str(onnx_path), load_external_data=True)
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    state = component.state_dict()

    def onnx_name(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    # Initializers that carry a parameter's own name belong to it; only the rest are matched by content.
    named = {onnx_name(key) for key in state}
    by_content: dict[str, list[str]] = {}
    for name, array in initializers.items():
        if name not in named and array.dtype.kind == "f" and array.size > 1:
            by_content.setdefault(_digest(array.astype(np.float32)), []).append(name)

    mapping: dict[str, dict[str, Any]] = {}
    unmatched: list[str] = []
    for key, tensor in state.items():
        if onnx_name(key) in initializers:
            mapping[key] = {"onnx": onnx_name(key), "transpose": False}
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


def refit_map_path(onnx_path: Path) -> Path:
    """Where the map of `<dir>/<network>.onnx` lives: `<dir>/<network>.refit.json`."""
    return onnx_path.with_suffix(".refit.json")


def write_refit_map(onnx_path: Path, wrapper: nn.Module) -> tuple[Path, list[str]]:
    """Compute the map of the module `onnx_path` was exported from and write it next to the file.
    Returns (path, unmatched state-dict keys)."""
    mapping, unmatched = refit_name_map(onnx_path, wrapper)
    path = refit_map_path(onnx_path)
    document = {"version": REFIT_MAP_VERSION, "onnx": onnx_path.name, "map": mapping, "unmatched": unmatched}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)
    return path, unmatched


def read_refit_map(onnx_path: Path) -> dict[str, dict[str, Any]] | None:
    """The map written for `onnx_path`: state-dict key -> {"onnx": initializer name, "transpose": bool};
    None when there is none (an export from before refit maps, or a file exported outside ember)."""
    path = refit_map_path(onnx_path)
    if not path.is_file():
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("version") != REFIT_MAP_VERSION:
        return None
    return dict(document["map"])


class OnnxWeights:
    """The weights of one exported network, read from its .onnx (and external data files) on demand, in
    both layouts: by ONNX initializer name (what engines take) and by state-dict name (what LoRA merges).

    Nothing is read at construction: a 3.4 GB UNet costs memory only for the weights a LoRA touches.
    """

    def __init__(self, onnx_path: Path, refit_map: dict[str, dict[str, Any]]):
        self.path = onnx_path
        self.map = refit_map
        self._tensors: dict[str, onnx.TensorProto] | None = None

    def _proto(self, name: str) -> onnx.TensorProto:
        if self._tensors is None:
            # External data stays on disk: only the graph and the (small) embedded tensors are parsed.
            model = onnx.load(str(self.path), load_external_data=False)
            self._tensors = {init.name: init for init in model.graph.initializer}
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no initializer {name!r} (a stale refit map?)") from None

    def shape(self, onnx_name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._proto(onnx_name).dims)

    def dtype(self, onnx_name: str) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self._proto(onnx_name).data_type))

    def initializer(self, onnx_name: str) -> np.ndarray:
        """The initializer as stored in the file (ONNX layout), a fresh array."""
        array = numpy_helper.to_array(self._proto(onnx_name), base_dir=str(self.path.parent))
        return array if array.flags.writeable else array.copy()  # raw data comes as a read-only buffer

    def same_as_file(self, onnx_name: str, array: np.ndarray) -> bool:
        """Whether `array` holds exactly the file's bits for this initializer. External data is memory-mapped
        and a strided sample compared first, so a weight that differs (a fused LoRA weight) costs a few
        pages, not a read of the whole tensor; only a restored base weight is compared in full."""
        proto = self._proto(onnx_name)
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(proto)
            stored: np.ndarray = np.memmap(
                self.path.parent / info.location,
                dtype=self.dtype(onnx_name).newbyteorder("<"),
                mode="r",
                offset=info.offset or 0,
                shape=self.shape(onnx_name),
            )
        else:
            stored = numpy_helper.to_array(proto)
        if stored.shape != array.shape or stored.dtype.itemsize != array.dtype.itemsize:
            return False
        bits = f"u{array.dtype.itemsize}"  # bit patterns: -0.0 is not 0.0, NaN payloads count
        new, old = array.reshape(-1).view(bits), np.asarray(stored).reshape(-1).view(bits)
        step = max(1, new.size // 1024)
        return bool(np.array_equal(new[::step], old[::step]) and np.array_equal(new, old))

    def to_onnx(self, key: str, value: torch.Tensor) -> tuple[str, np.ndarray]:
        """A weight in state-dict layout -> (initializer name, contiguous array in the initializer's layout
        and dtype). ValueError when the shape is not the weight's."""
        entry = self.map[key]
        name, transpose = entry["onnx"], bool(entry["transpose"])
        want = self.shape(name)
        tensor = value.detach().to("cpu")
        if transpose:
            tensor = tensor.t()
        if tuple(tensor.shape) != want:
            got = tuple(value.shape)
            raise ValueError(f"{key}: shape {got} != {want[::-1] if transpose else want}")
        return name, np.ascontiguousarray(tensor.numpy().astype(self.dtype(name), copy=False))

    def to_state(self, key: str, array: np.ndarray) -> torch.Tensor:
        """An initializer's array -> the weight in state-dict layout (the transpose undone)."""
        tensor = torch.from_numpy(array)
        return tensor.t() if self.map[key]["transpose"] else tensor


class CurrentWeights(Mapping[str, torch.Tensor]):
    """state-dict name -> the weight a run uses now: the override if any, else the file's initializer."""

    def __init__(self, table: OnnxWeights, overrides: Mapping[str, np.ndarray]):
        self._table, self._overrides = table, overrides

    def __getitem__(self, key: str) -> torch.Tensor:
        name = self._table.map[key]["onnx"]
        array = self._overrides.get(name)
        return self._table.to_state(key, array.copy() if array is not None else self._table.initializer(name))

    def __contains__(self, key: object) -> bool:  # by name, without reading the weight
        return key in self._table.map

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.map)

    def __len__(self) -> int:
        return len(self._table.map)


def stage_refit(
    table: OnnxWeights, current: dict[str, np.ndarray], weights: Mapping[str, torch.Tensor], network: str
) -> dict[str, np.ndarray]:
    """Check `weights` (state-dict names) and convert them to initializer arrays, then record them in
    `current` (initializer name -> array, only those that differ from the file's), all or nothing.
    Returns every given weight by initializer name. KeyError / ValueError name the bad weight."""
    unknown = sorted(set(weights) - set(table.map))
    if unknown:
        raise KeyError(
            f"{network} has no weights named {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
            "(or they were folded into other constants at export: not refittable by name)"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        try:
            name, arrays[name] = table.to_onnx(key, value)
        except ValueError as exc:
            raise ValueError(f"{network}.{exc}") from None
    for name, array in arrays.items():
        if table.same_as_file(name, array):
            current.pop(name, None)  # the file's own value (a restored base): nothing to keep or feed
        else:
            current[name] = array
    return arrays
