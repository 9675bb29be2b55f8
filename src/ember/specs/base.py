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
DYNAMIC_AXES = frozenset({"batch", "latent_height", "latent_width", "image_height", "image_width"})

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

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dims(self, config: Mapping[str, Any], batch: int, height: int, width: int) -> dict[str, int]:
        return {**self.static_dims(config), **self.image_dims(batch, height, width)}

    def sample_inputs(
        self, config: Mapping[str, Any], batch: int, height: int, width: int, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        dims = self.dims(config, batch, height, width)
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


def randn_sample(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=spec.dtype)
