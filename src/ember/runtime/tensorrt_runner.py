"""TensorRT 10: the production runtime in the NGC Triton container.

Engines come from `python -m export engines` (ember.runtime.tensorrt_build): one plan per network with one
optimization profile per shape bucket (fal's image_size presets, optionally a dynamic one). At run time:

- one execution context per profile, created lazily, all with user-managed device memory: every engine of
  the process shares one activation buffer sized to the largest need across engines and profiles
  (`SharedActivations`). The networks of a pipeline run one after another on one stream, so at most one
  context uses the buffer at any time; sharing cuts activation memory from sum to max (SDXL: ~3x less).
- preallocated input/output buffers per static bucket at the bucket's max batch; a call of batch b uses the
  leading b rows, so tensor addresses never change for a bucket;
- one CUDA graph per (static bucket, batch), captured on the second call of that shape (the first call does
  TensorRT's lazy setup, which must not be captured): replaying it removes the per-layer launch overhead;
- refit for LoRA with trt.Refitter (engines built with `--refit lora`), keyed by the source state-dict names
  and mapped to the ONNX initializer names the parser gave the weights by the same `<network>.refit.json`
  that ONNX Runtime uses (ember.runtime.refit_map, written next to the ONNX the plan was built from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ember.runtime.base import RefitNotSupportedError, Runner
from ember.runtime.refit_map import CurrentWeights, OnnxWeights, read_refit_map, stage_refit
from ember.specs.base import NetworkSpec, ShapeBucket

try:
    import tensorrt as trt
except ImportError:  # CPU machines, CI: the runtime is simply unavailable
    trt = None


def tensorrt_available() -> bool:
    return trt is not None


def _require() -> Any:
    if trt is None:
        raise RuntimeError(
            "TensorRT is not installed (pip install tensorrt-cu12, or use the NGC Triton image)"
        )
    return trt


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


class SharedActivations:
    """One device buffer for the activations of every engine context in this process (per device).

    Engines report their largest per-profile need; the buffer grows to the max. `generation` changes when it
    is reallocated, so contexts re-bind (and CUDA graphs, which captured the old address, are dropped).
    """

    _by_device: ClassVar[dict[str, SharedActivations]] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.generation = 0

    @classmethod
    def for_device(cls, device: torch.device) -> SharedActivations:
        return cls._by_device.setdefault(str(device), cls(device))

    def reserve(self, nbytes: int) -> None:
        if self.buffer is None or self.buffer.numel() < nbytes:
            # 256-byte aligned by the caching allocator, as TensorRT requires.
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self.generation += 1

    @property
    def address(self) -> int:
        assert self.buffer is not None  # reserve() ran in every engine's __init__
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()


class _Bucket:
    """The execution context of one profile, and for static buckets its I/O buffers and CUDA graphs."""

    def __init__(self, index: int, bucket: ShapeBucket):
        self.index = index
        self.bucket = bucket
        self.context: Any = None
        self.generation = -1
        self.inputs: dict[str, torch.Tensor] = {}  # at batch_max, static buckets only
        self.outputs: dict[str, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch -> graph
        self.seen: set[int] = set()  # batches run once (TensorRT's lazy setup done)


class TensorRTEngine:
    """One deserialized plan with its profiles; `run` picks the bucket covering the call's shape."""

    def __init__(
        self,
        spec: NetworkSpec,
        plan: Path,
        buckets: Sequence[ShapeBucket],
        device: str = "cuda",
        cuda_graphs: bool = True,
        stream: torch.cuda.Stream | None = None,
        refit_from: Path | None = None,
    ):
        """`refit_from`: the ONNX file whose weights fill a weight-stripped plan (built with --refit strip)."""
        trt_ = _require()
        if not plan.is_file():
            raise FileNotFoundError(f"no TensorRT engine at {plan}: build engines for this GPU first")
        self.spec = spec
        self.device = torch.device(device)
        self.plan = plan
        self.cuda_graphs = cuda_graphs
        self._logger = trt_.Logger(trt_.Logger.WARNING)
        self._runtime = trt_.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan} (built by another TensorRT version?)")
        if self.engine.num_optimization_profiles != len(buckets):
            raise RuntimeError(
                f"{plan} has {self.engine.num_optimization_profiles} profiles, engines.json lists {len(buckets)}"
            )
        if refit_from is not None:
            # Stripped plans carry no weights: the ONNX parser's refitter loads them (REFIT_IDENTICAL: the
            # exact build weights, so the kernels chosen for them stay valid).
            refitter = trt_.Refitter(self.engine, self._logger)
            if not trt_.OnnxParserRefitter(refitter, self._logger).refit_from_file(str(refit_from)):
                raise RuntimeError(f"could not refit {plan} from {refit_from} (rebuild the engines)")
            if not refitter.refit_cuda_engine():
                raise RuntimeError(f"refit of {plan} from {refit_from} failed")
        self.stream = stream or torch.cuda.Stream(self.device)
        self._buckets = [_Bucket(i, b) for i, b in enumerate(buckets)]
        self._shared = SharedActivations.for_device(self.device)
        self._shared.reserve(max(self._profile_memory(i) for i in range(len(buckets))))
        self._dtypes = {
            name: _torch_dtype(self.engine.get_tensor_dtype(name))
            for name in (*spec.input_names, *spec.output_names)
        }

    def _profile_memory(self, profile: int) -> int:
        engine = self.engine
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):  # TensorRT >= 10.1
            return int(engine.get_device_memory_size_for_profile_v2(profile))
        return int(engine.device_memory_size)

    def _context(self, slot: _Bucket) -> Any:
        if slot.context is None:
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            slot.context = self.engine.create_execution_context(strategy)
            slot.context.set_optimization_profile_async(slot.index, self.stream.cuda_stream)
        if slot.generation != self._shared.generation:
            # (Re)bind the shared activation buffer; graphs captured with the old one are invalid now.
            if hasattr(slot.context, "set_device_memory"):  # TensorRT >= 10.1
                slot.context.set_device_memory(self._shared.address, self._shared.nbytes)
            else:
                slot.context.device_memory = self._shared.address
            slot.generation = self._shared.generation
            slot.graphs.clear()
            slot.seen.clear()
        return slot.context

    def _select(self, shapes: Mapping[str, tuple[int, ...]]) -> _Bucket:
        """The first profile whose min/max corners bound every input shape (static buckets come first)."""
        for slot in self._buckets:
            if all(self._within(slot.index, name, shape) for name, shape in shapes.items()):
                return slot
        known = ", ".join(s.bucket.key() for s in self._buckets)
        raise ValueError(
            f"{self.spec.name}: no engine profile covers input shapes {dict(shapes)} (profiles: {known}); "
            "rebuild engines with --dynamic or a bucket for this size"
        )

    def _within(self, profile: int, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, profile)
        return len(shape) == len(low) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
        )

    def _static_buffers(self, slot: _Bucket, context: Any) -> None:
        """Allocate a static bucket's I/O at its max batch and bind their (fixed) addresses once."""
        for t in self.spec.inputs:
            shape = tuple(int(x) for x in self.engine.get_tensor_profile_shape(t.name, slot.index)[2])
            slot.inputs[t.name] = torch.empty(shape, dtype=self._dtypes[t.name], device=self.device)
            context.set_input_shape(t.name, shape)
            context.set_tensor_address(t.name, slot.inputs[t.name].data_ptr())
        for name in self.spec.output_names:
            shape = tuple(context.get_tensor_shape(name))
            slot.outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            context.set_tensor_address(name, slot.outputs[name].data_ptr())

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        slot = self._select({t.name: tuple(feeds[t.name].shape) for t in self.spec.inputs})
        batch = int(feeds[self.spec.inputs[0].name].shape[0])
        context = self._context(slot)
        static = not slot.bucket.dynamic
        if static and not slot.inputs:
            self._static_buffers(slot, context)
        # Inputs were produced on the caller's stream; everything below runs on ours.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            bound: dict[str, torch.Tensor] = {}  # dynamic buckets: keep tensors alive until the sync
            for t in self.spec.inputs:
                value = feeds[t.name].to(self.device, self._dtypes[t.name])
                if static:
                    slot.inputs[t.name][:batch].copy_(value)
                    context.set_input_shape(t.name, (batch, *slot.inputs[t.name].shape[1:]))
                else:
                    bound[t.name] = value.contiguous()
                    context.set_input_shape(t.name, tuple(value.shape))
                    context.set_tensor_address(t.name, bound[t.name].data_ptr())
            outputs: dict[str, torch.Tensor] = {}
            for name in self.spec.output_names:
                shape = tuple(context.get_tensor_shape(name))  # resolved from the input shapes just set
                if static:
                    outputs[name] = slot.outputs[name][:batch]
                else:
                    outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                    context.set_tensor_address(name, outputs[name].data_ptr())
            self._execute(slot, context, batch, graph=static and self.cuda_graphs)
            # Copies (float32, as the Runner contract says) so the next call can reuse the static buffers;
            # `copy=True` because .float() of a float32 view would return the buffer itself.
            result = {
                name: (t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone())
                for name, t in outputs.items()
            }
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.stream.synchronize()
        return result

    def _execute(self, slot: _Bucket, context: Any, batch: int, graph: bool) -> None:
        if graph and batch in slot.graphs:
            slot.graphs[batch].replay()
            return
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.spec.name}")
        if graph and batch in slot.seen:
            # Second call of this shape: TensorRT's lazy setup is done, capture the enqueue.
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, stream=self.stream):
                context.execute_async_v3(self.stream.cuda_stream)
            slot.graphs[batch] = cuda_graph
        slot.seen.add(batch)

    def refit(self, weights: Mapping[str, Any]) -> None:
        """Set engine weights by their ONNX initializer names (numpy or torch CPU tensors), then refit."""
        trt_ = _require()
        refitter = trt_.Refitter(self.engine, self._logger)
        keep = []  # trt.Weights borrow the array memory until refit_cuda_engine returns
        for name, value in weights.items():
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            array = array.__array__()
            keep.append(array)
            if not refitter.set_named_weights(name, trt_.Weights(array)):
                raise KeyError(f"{self.spec.name}: the engine has no refittable weight named {name!r}")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise RuntimeError(f"{self.spec.name}: refit failed; weights still missing: {list(missing)[:5]}")
        for slot in self._buckets:  # weights moved under captured graphs: capture again
            slot.graphs.clear()
            slot.seen.clear()

    def close(self) -> None:
        for slot in self._buckets:
            slot.graphs.clear()
            slot.context = None
        self.engine = None


class TensorRTRunner(Runner):
    """A Runner over one network of an engine set (see ember.runtime.engine_cache.EngineSet)."""

    def __init__(self, spec: NetworkSpec, engine_set: Any, device: str = "cuda", cuda_graphs: bool = True):
        self.name = spec.name
        self.device = torch.device(device)
        stripped = engine_set.manifest["key"].get("refit") == "strip"
        onnx = Path(engine_set.manifest["networks"][spec.name]["onnx"]) if stripped else None
        self._engine = TensorRTEngine(
            spec,
            engine_set.plan(spec.name),
            engine_set.buckets(spec.name),
            device,
            cuda_graphs,
            refit_from=onnx,
        )
        # The map of the exact ONNX this plan was parsed from (the fp32 export, or the strongly typed one,
        # whose folded initializers have other generated names).
        self._onnx = Path(engine_set.manifest["networks"][spec.name]["onnx"])
        self._refit_map: dict[str, Any] = read_refit_map(self._onnx) or {}
        self._refittable = bool(engine_set.manifest["key"].get("refit") == "lora")
        # The base weights, read from that ONNX on demand, and those refit away from it (initializer name
        # -> array): together the weights the engine holds now.
        self._table = OnnxWeights(self._onnx, self._refit_map)
        self._current: dict[str, Any] = {}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._engine.run(feeds)

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """`weights` by the diffusers component's state-dict names (fused LoRA), mapped to ONNX names."""
        self._check_refittable()
        # Cast to each initializer's dtype (fp16 in a strongly typed export), transposed where folded.
        self._engine.refit(stage_refit(self._table, self._current, weights, self.name))

    def weights(self) -> Mapping[str, torch.Tensor]:
        """The engine's current weights by state-dict name: the base a LoRA merges onto (LoraState)."""
        self._check_refittable()
        return CurrentWeights(self._table, self._current)

    def _check_refittable(self) -> None:
        if not self._refittable:
            raise RefitNotSupportedError(
                f"the engines of {self.name!r} were built without refit: rebuild with "
                "`python -m export engines --refit lora` to apply LoRA on TensorRT"
            )
        if not self._refit_map:
            raise RefitNotSupportedError(
                f"{self._onnx} has no refit map ({self._onnx.with_suffix('.refit.json').name}): re-export "
                "with `python -m export onnx` and rebuild the engines"
            )


def map_refit_weights(
    refit_map: Mapping[str, Mapping[str, Any]], weights: Mapping[str, torch.Tensor], network: str
) -> dict[str, torch.Tensor]:
    """State-dict names -> ONNX initializer names, transposing where the exporter folded a transpose."""
    unknown = sorted(set(weights) - set(refit_map))
    if unknown:
        raise KeyError(f"{network} has no refittable weights named {unknown[:5]}")
    out = {}
    for key, value in weights.items():
        entry = refit_map[key]
        out[entry["onnx"]] = value.t().contiguous() if entry["transpose"] else value.contiguous()
    return out
