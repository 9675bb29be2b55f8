"""TensorRT 10: the production runtime in the NGC Triton container.

Engines are built per GPU from the ONNX exports (a later `export/` tool) into
`<artifacts>/tensorrt/<trt version>-sm<cc>/<network>.plan`. This module only deserializes and runs them with the
TensorRT 10 name-based API: set_input_shape + set_tensor_address per tensor, execute_async_v3 on one stream.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ember.runtime.base import Runner
from ember.specs.artifacts import Artifacts
from ember.specs.base import NetworkSpec

try:
    import tensorrt as trt
except ImportError:  # CPU machines, CI: the runtime is simply unavailable
    trt = None


def tensorrt_available() -> bool:
    return trt is not None


def engine_path(artifacts: Artifacts, network: str, device: torch.device) -> Path:
    if trt is None:
        raise RuntimeError("TensorRT is not installed (pip install tensorrt, or use the NGC Triton image)")
    major, minor = torch.cuda.get_device_capability(device)
    return artifacts.path / "tensorrt" / f"{trt.__version__}-sm{major}{minor}" / f"{network}.plan"


def _torch_dtype(dtype: object) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }
    return table[dtype]


class TensorRTRunner(Runner):
    def __init__(self, spec: NetworkSpec, plan: Path, device: str = "cuda"):
        if trt is None:
            raise RuntimeError(
                "TensorRT is not installed (pip install tensorrt, or use the NGC Triton image)"
            )
        if not plan.is_file():
            raise FileNotFoundError(f"no TensorRT engine at {plan}: build engines for this GPU first")
        self.name = spec.name
        self.device = torch.device(device)
        self._spec = spec
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan} (built by another TensorRT version?)")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine, context = self._engine, self._context
        # Keep every bound tensor referenced until the stream is done with it.
        bound: dict[str, torch.Tensor] = {}
        for name in self._spec.input_names:
            dtype = _torch_dtype(engine.get_tensor_dtype(name))
            tensor = feeds[name].to(self.device, dtype).contiguous()
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
            bound[name] = tensor
        outputs: dict[str, torch.Tensor] = {}
        for name in self._spec.output_names:
            shape = tuple(context.get_tensor_shape(name))  # resolved from the input shapes just set
            out = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        # Inputs were written on the current stream; the engine runs on ours.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.name}")
        self._stream.synchronize()
        return {name: (t.float() if t.is_floating_point() else t) for name, t in outputs.items()}
