"""What every exported network declares once: tensor names, dtypes, axes, shape profiles and a sample input.

A tensor's axes are named. Named axes in `DYNAMIC_AXES` vary per call (they become ONNX dynamic axes and
TensorRT min/opt/max profiles); the others are fixed by the model's config (`NetworkSpec.static_dims`), so
one spec serves the tiny demo model and the full-size one alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Axes whose size changes from call to call.
DYNAMIC_AXES = frozenset(
    {"batch", "latent_height", "latent_width", "image_height", "image_width",
     # Stable Cascade's stage C latent ("image embeddings"), a second, coarser latent grid.
     "embed_height", "embed_width",
     # The UNet's coarser grids (latent / 2, / 4, / 8, rounded up), where ControlNet residuals live.
     "latent_height_2", "latent_width_2", "latent_height_4", "latent_width_4",
     "latent_height_8", "latent_width_8",
     # Text tokens of a conditioning made of several 77-token windows (fal-ai/lora's long weighted prompts:
     # 77 x 1..8); the fixed 77 of the other specs is "sequence".
     "text_sequence"}
)

# fal's `image_size` presets (width, height); custom sizes are multiples of 8 (fal-schemas.md §1.1).
FAL_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
# Images per network call that engine profiles cover (Triton max_batch_size 8 x a few images each);
# the pipeline splits larger groups into chunks of at most this many images.
MAX_BATCH_IMAGES = 16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    axes: tuple[str, ...]

    def shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(dims[axis] for axis in self.axes)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: axis for i, axis in enumerate(self.axes) if axis in DYNAMIC_AXES}


@dataclass(frozen=True)
class ShapeProfile:
    """Sizes of the dynamic axes at the min / opt / max corners of an engine profile."""

    min: dict[str, int]
    opt: dict[str, int]
    max: dict[str, int]


@dataclass(frozen=True)
class NetworkSpec:
    """One exported network.

    `load` builds the wrapper module from a diffusers/transformers source (HF id or directory) with
    `from_pretrained`; the wrapper's forward takes the inputs by name, in order, and returns the outputs
    (a tensor, or a tuple in `outputs` order).
    """

    name: str  # file stem of the export and the runner's key: "unet" -> unet.onnx
    subfolder: str  # diffusers component folder the weights come from
    version: int  # bump when the wrapper or the io changes: it is part of the export cache key
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    load: Callable[[str, str | None, torch.dtype], nn.Module]
    # Sizes of the fixed axes, read from the component's config.
    static_dims: Callable[[Mapping[str, Any]], dict[str, int]]
    # Sizes of the dynamic axes for a batch of images of (height, width) pixels.
    image_dims: Callable[[int, int, int], dict[str, int]]
    # Builds a sample input tensor for one input name and shape (ids need a valid range, floats are randn).
    sample: Callable[[TensorSpec, tuple[int, ...], torch.Generator], torch.Tensor]
    # Engine precision this network must keep whatever the engine build asks for (e.g. torch.float32 for
    # SDXL's VAE, whose activations overflow fp16); None follows the build's precision.
    engine_dtype: torch.dtype | None = None
    # (batch, height, width) px to trace / verify the ONNX export at, when the exporter's defaults do not fit
    # the network (e.g. a DiT needs even latent sides); None uses onnx_export.TRACE_SHAPE / VERIFY_SHAPE.
    trace_shape: tuple[int, int, int] | None = None
    verify_shape: tuple[int, int, int] | None = None
    # Sizes of other dynamic axes (e.g. "text_sequence") to trace / verify the export at, over static_dims'
    # value; tracing and verifying at different sizes makes a length baked into the graph fail verification.
    trace_dims: Mapping[str, int] | None = None
    verify_dims: Mapping[str, int] | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dims(self, config: Mapping[str, Any], batch: int, height: int, width: int) -> dict[str, int]:
        return {**self.static_dims(config), **self.image_dims(batch, height, width)}

    def sample_inputs(
        self,
        config: Mapping[str, Any],
        batch: int,
        height: int,
        width: int,
        seed: int = 0,
        overrides: Mapping[str, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`overrides`: sizes of axes other than batch and image (trace_dims / verify_dims)."""
        dims = {**self.dims(config, batch, height, width), **(overrides or {})}
        generator = torch.Generator().manual_seed(seed)
        return {t.name: self.sample(t, t.shape(dims), generator) for t in self.inputs}

    def profile(self, config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT min/opt/max input shapes covering fal's presets: 256..1024 px, opt at the 512 default."""
        sizes = [side for wh in FAL_IMAGE_SIZES.values() for side in wh]
        corners = ShapeProfile(
            min=self.dims(config, 1, 256, 256),
            opt=self.dims(config, 1, 512, 512),
            max=self.dims(config, MAX_BATCH_IMAGES, max(sizes), max(sizes)),
        )
        return {
            t.name: (t.shape(corners.min), t.shape(corners.opt), t.shape(corners.max)) for t in self.inputs
        }


    def bucket_profile(
        self, config: Mapping[str, Any], bucket: ShapeBucket
    ) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT min/opt/max input shapes of one bucket: its image size fixed, the batch in its range."""
        corners = [self.dims(config, b, h, w) for b, h, w in bucket.corners()]
        return {t.name: tuple(t.shape(c) for c in corners) for t in self.inputs}

    def size_dependent(self) -> bool:
        """Whether any input shape changes with the image size (the text encoder's does not)."""
        return any(axis in DYNAMIC_AXES - {"batch"} for t in self.inputs for axis in t.axes)


@dataclass(frozen=True)
class ShapeBucket:
    """One engine optimization profile: images of height x width px, batch from min to max (opt in between).

    Static buckets pin the image size, so TensorRT picks kernels for exactly that shape and the runtime can
    capture one CUDA graph per (bucket, batch). A "dynamic" bucket spans 256..1024 px for custom sizes.
    """

    name: str
    height: int
    width: int
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = MAX_BATCH_IMAGES
    # Pixel range of a dynamic bucket (height/width above are then the opt corner).
    min_side: int | None = None
    max_side: int | None = None

    @property
    def batches(self) -> tuple[int, int, int]:
        return (self.batch_min, self.batch_opt, self.batch_max)

    def corners(self) -> tuple[tuple[int, int, int], ...]:
        """(batch, height, width) at the min, opt and max corners."""
        lo = self.min_side or self.height, self.min_side or self.width
        hi = self.max_side or self.height, self.max_side or self.width
        return ((self.batch_min, *lo), (self.batch_opt, self.height, self.width), (self.batch_max, *hi))

    @property
    def dynamic(self) -> bool:
        return self.min_side is not None

    def covers(self, batch: int, height: int, width: int) -> bool:
        if not self.batch_min <= batch <= self.batch_max:
            return False
        if self.dynamic:
            lo, hi = self.min_side or 0, self.max_side or 0
            return lo <= height <= hi and lo <= width <= hi
        return (height, width) == (self.height, self.width)

    def key(self) -> str:
        side = f"{self.min_side}-{self.max_side}px" if self.dynamic else f"{self.height}x{self.width}"
        return f"{self.name}:{side}:b{self.batch_min}-{self.batch_opt}-{self.batch_max}"


def fal_buckets(
    max_batch: int = MAX_BATCH_IMAGES, opt_batch: int = 1, dynamic: bool = False
) -> tuple[ShapeBucket, ...]:
    """One static bucket per fal image_size preset (height x width), plus an optional dynamic one."""
    buckets = [
        ShapeBucket(name, height=h, width=w, batch_opt=opt_batch, batch_max=max_batch)
        for name, (w, h) in FAL_IMAGE_SIZES.items()
    ]
    if dynamic:
        buckets.append(
            ShapeBucket("dynamic", 512, 512, batch_opt=opt_batch, batch_max=max_batch, min_side=256, max_side=1024)
        )
    return tuple(buckets)


def randn_sample(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=spec.dtype)
