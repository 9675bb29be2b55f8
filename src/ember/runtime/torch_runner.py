"""PyTorch: the reference on CPU, and a fast GPU path where no engine is built.

On CUDA: fp16/bf16 weights, attention through scaled_dot_product_attention (diffusers' default processor,
attn_implementation="sdpa" for CLIP), channels_last convolutions, and optionally `torch.compile`:

- reduce-overhead: inductor kernels + torch's own CUDA graphs (one per input shape, managed by cudagraph trees);
- max-autotune: inductor with autotuned GEMM/conv templates but no graphs of its own
  (mode="max-autotune-no-cudagraphs"), then one CUDA graph per input shape captured here (`ShapeGraphs`).

Either way the runner warms up at load for the shapes it is told to expect, so no request pays for compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ember.runtime.base import Runner
from ember.specs.base import NetworkSpec

COMPILE_MODES = ("none", "reduce-overhead", "max-autotune")
# Warm-up shapes when none are given: one image at fal's default 512 x 512.
DEFAULT_WARMUP = ((1, 512, 512),)

Signature = tuple[tuple[int, ...], ...]


def optimize_module(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The eager-mode part of the recipe: weights in `dtype` on `device`, NHWC convolutions on CUDA."""
    module = module.to(device=device, dtype=dtype).eval()
    if device.type == "cuda":
        # cuDNN's fp16/bf16 tensor-core convolutions are native in NHWC; NCHW inputs are converted per call.
        module = module.to(memory_format=torch.channels_last)
    return module


class ShapeGraphs:
    """One CUDA graph per input-shape signature around `fn`: static input buffers, captured once, replayed.

    Replay reads the inputs from the static buffers and writes the static outputs; callers get clones, so
    a later replay cannot overwrite a result still in use.
    """

    def __init__(self, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], device: torch.device):
        self.fn = fn
        self.device = device
        self.graphs: dict[
            Signature, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]
        ] = {}
        self.pool = torch.cuda.graph_pool_handle()  # graphs of all shapes share one memory pool

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        signature = tuple(tuple(a.shape) for a in args)
        if signature not in self.graphs:
            self.graphs[signature] = self._capture(args)
        graph, inputs, outputs = self.graphs[signature]
        for buffer, value in zip(inputs, args, strict=True):
            buffer.copy_(value)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def _capture(
        self, args: Sequence[torch.Tensor]
    ) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]:
        inputs = [a.clone() for a in args]
        # Warm up on a side stream first (torch.cuda.graphs docs): lazy init and autotuning must not be captured.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*inputs)
        outputs = out if isinstance(out, tuple) else (out,)
        return graph, inputs, outputs


class TorchRunner(Runner):
    """Loads the spec's wrapper module from the diffusers source (HF id or directory) with `from_pretrained`."""

    def __init__(
        self,
        spec: NetworkSpec,
        source: str,
        revision: str | None,
        device: str,
        dtype: torch.dtype,
        compile_mode: str = "none",
        warmup: Iterable[tuple[int, int, int]] | None = None,
        module: nn.Module | None = None,
    ):
        """`module`: an already built wrapper (benchmarks build full-size random-weight ones) instead of
        loading `source`. `warmup`: (batch, height, width) shapes to run once at load."""
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"torch compile mode must be one of {COMPILE_MODES}, not {compile_mode!r}")
        self.name = spec.name
        self.device = torch.device(device)
        self._spec = spec
        self._dtype = dtype
        loaded = module if module is not None else spec.load(source, revision, dtype)
        self._module = optimize_module(loaded, self.device, dtype)
        # torch.compile only on CUDA: on CPU inductor needs a C++ toolchain and gains little for these nets.
        self.compile_mode = compile_mode if self.device.type == "cuda" else "none"
        self._forward = self._build_forward(self.compile_mode)
        # Warm-up pays off on CUDA (cuDNN autotune, compilation, graph capture); on CPU only when asked.
        if warmup is not None or self.device.type == "cuda":
            self.warm_up(DEFAULT_WARMUP if warmup is None else warmup)

    @property
    def module(self) -> nn.Module:
        """The spec's wrapper module this runner runs (e.g. to wrap the same weights for another spec)."""
        return self._module

    @property
    def spec(self) -> NetworkSpec:
        """The spec this runner runs (its inputs' names and order: `run` feeds them positionally)."""
        return self._spec

    def _build_forward(self, compile_mode: str) -> Callable[..., tuple[torch.Tensor, ...]]:
        def eager(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self._module(*args)
            return out if isinstance(out, tuple) else (out,)

        if compile_mode == "none":
            return eager
        if compile_mode == "reduce-overhead":
            compiled = torch.compile(self._module, mode="reduce-overhead", fullgraph=False)

            def with_cudagraph_trees(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
                torch.compiler.cudagraph_mark_step_begin()  # outputs of the last call may be overwritten now
                out = compiled(*args)
                return tuple(o.clone() for o in (out if isinstance(out, tuple) else (out,)))

            return with_cudagraph_trees
        compiled = torch.compile(self._module, mode="max-autotune-no-cudagraphs", fullgraph=False)
        return ShapeGraphs(compiled, self.device)

    def _args(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        args = []
        for t in self._spec.inputs:
            value = feeds[t.name].to(self.device)
            if value.is_floating_point():
                value = value.to(self._dtype)
                if value.dim() == 4 and self.device.type == "cuda":
                    value = value.contiguous(memory_format=torch.channels_last)
            else:
                value = value.to(t.dtype)
            args.append(value)
        return args

    def warm_up(self, shapes: Iterable[tuple[int, int, int]]) -> None:
        """Run once per (batch, height, width): compiles and captures graphs now rather than in a request.
        Needs the wrapper's `config` (the component config the spec sizes tensors from); skipped without it."""
        config = getattr(self._module, "config", None)
        if config is None:
            return
        for batch, height, width in shapes:
            self.run(self._spec.sample_inputs(dict(config), batch, height, width))

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            outs = self._forward(*self._args(feeds))
        return {
            t.name: (value.float() if value.is_floating_point() else value)
            for t, value in zip(self._spec.outputs, outs, strict=True)
        }

    def weights(self) -> Mapping[str, torch.Tensor]:
        (component,) = self._module.children()  # each spec wrapper holds exactly one diffusers module
        return component.state_dict()

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy `weights` (the diffusers component's state-dict names, e.g. fused LoRA deltas) in place.

        Compiled code and captured graphs read the parameters by address, so in-place copies reach them too.
        """
        (component,) = self._module.children()  # each spec wrapper holds exactly one diffusers module
        state = component.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise KeyError(
                f"{self.name} has no weights named {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
        with torch.no_grad():
            for key, value in weights.items():
                if state[key].shape != value.shape:
                    raise ValueError(
                        f"{self.name}.{key}: shape {tuple(value.shape)} != {tuple(state[key].shape)}"
                    )
                state[key].copy_(value)
