"""What an endpoint is to the gateway: its fal schema, its Triton model, and the translation
between the two (STYLE.md 1). The gateway knows nothing else about an endpoint."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel

from ember.endpoints.common import Loc, StoredFile, StoredImage, WeightsFile

TritonTensors = dict[str, np.ndarray]


class ImageSink(Protocol):
    """Where `to_output` puts the files it returns: the gateway stores each one (a URL on its file host)
    or, with sync_mode, returns it inline as a data URI (ember.gateway.files.FileStore.sink)."""

    def __call__(self, image: np.ndarray, fmt: str, /) -> Awaitable[StoredImage]:
        """Encodes one (H, W, 3) uint8 image in the given format ("jpeg" | "png") and stores it."""
        ...

    def file(self, data: bytes, content_type: str, extension: str, /) -> Awaitable[StoredFile]:
        """Stores one already-encoded file that is not an image (e.g. safetensors debug latents) as is;
        `extension` (no dot) ends its generated name."""
        ...

# What `Endpoint.load` fetched, by name (e.g. {"image": (H, W, 3) uint8 array}).
Loaded = Mapping[str, Any]
_NOTHING: Loaded = {}


class MediaLoader(Protocol):
    """How an endpoint reads the URL inputs it names (image_url, mask_url, weight files).

    The gateway's implementation (ember.gateway.inputs) fetches through the SSRF-safe fetcher (or
    reads the gateway's own file URLs locally), checks sizes before decoding, and decodes with pixel
    and format limits. Every failure raises `InputError` at `loc`, answered 422.
    """

    async def image(self, url: str, loc: Loc, *, mode: str = "RGB") -> np.ndarray:
        """(H, W, 3) uint8 for mode "RGB", (H, W) for mode "L"."""
        ...

    async def weights(self, url: str, loc: Loc) -> WeightsFile:
        """A safetensors file, its header parsed and checked; anything else (pickle, zip, torch) refused."""
        ...

    async def checkpoint(self, url: str, loc: Loc, *, kind: str = "model") -> str:
        """A single-file model checkpoint (GBs: streamed to disk, checked like `weights`, stored by
        sha256 where the Triton side reads it): its absolute path. `kind`: "model" (a full SD checkpoint)
        or "unet" (UNet weights only: a single-file UNet, an IC-Light offset file) or "controlnet" (a
        single-file ControlNet, diffusers' or the original key names)."""
        ...

    async def json(self, url: str, loc: Loc) -> dict[str, Any]:
        """A small JSON object (a model's config.json: at most 64 KiB), parsed; anything else refused."""
        ...

    async def model_pack(self, url: str, loc: Loc) -> str:
        """A .zip of ONNX model files (an InsightFace model pack such as buffalo_l.zip), streamed to disk
        like `checkpoint` and its central directory checked (only .onnx files are used): its absolute path."""
        ...

In = TypeVar("In", bound=BaseModel)


def bytes_tensor(value: str) -> np.ndarray:
    """A (1, 1) TYPE_STRING tensor: batch of one request, one element."""
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def scalar_tensor(value: float | bool, dtype: type) -> np.ndarray:
    """A (1, 1) tensor of the given numpy dtype."""
    return np.array([[value]], dtype=dtype)


class Endpoint(ABC, Generic[In]):
    endpoint_id: ClassVar[str]
    triton_model: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    output_model: ClassVar[type[BaseModel]]

    def check(self, inp: In) -> None:
        """Raise InputError for what the schema allows but this server cannot serve as asked."""

    def notes(self, inp: In) -> list[str]:
        """Lines for the job's logs about how the request was interpreted."""
        return []

    def seed_of(self, inp: In) -> int | None:
        return getattr(inp, "seed", None)

    def sync_mode(self, inp: In) -> bool:
        """True when images go back as data URIs instead of stored files."""
        return bool(getattr(inp, "sync_mode", False))

    async def load(self, inp: In, media: MediaLoader) -> Loaded:
        """Fetch and decode what the input names by URL, through `media`; runs before `to_triton`,
        when the job starts (never at submit). Default: nothing to load."""
        return _NOTHING

    @abstractmethod
    def to_triton(self, inp: In, seed: int, loaded: Loaded = _NOTHING) -> TritonTensors:
        """The Triton model's input tensors, each with a leading batch dimension of 1."""

    @abstractmethod
    async def to_output(self, inp: In, seed: int, outputs: TritonTensors, store: ImageSink) -> BaseModel:
        """The fal output from the model's final response; images go through `store`."""
