"""Schema pieces the five fal endpoints share (../shared/fal-schemas.md §1), and the closed set of
input errors every endpoint raises.

Nothing here imports FastAPI or torch: the gateway, the tests and the Triton side all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# fal's presets, width x height (fal-schemas.md §1.1; fal toolkit `image.py`).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
ImageSizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]

# Largest output we render, in pixels. fal's schema allows 14142 x 14142 (200 MP), which no
# diffusion pipeline here can produce; 2048 x 2048 is where every endpoint's model still works.
MAX_OUTPUT_PIXELS = 2048 * 2048
# A seed travels to Triton as INT64 and into torch.Generator.manual_seed.
MAX_SEED = 2**63 - 1


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="ignore")

    width: int = Field(default=512, gt=0, le=14142, description="The width of the generated image.")
    height: int = Field(default=512, gt=0, le=14142, description="The height of the generated image.")


ImageSizeField = ImageSize | ImageSizePreset


class SimpleImage(BaseModel):
    """The image object of sote-diffusion and lcm outputs (fal-schemas.md §1.6)."""

    url: str
    width: int
    height: int
    content_type: str = "image/jpeg"


class File(BaseModel):
    """fal's file object (lora's debug latents); `file_data` is accepted but never emitted."""

    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class Image(File):
    """The file-style image object of lora, pixart and illusion outputs (fal-schemas.md §1.6)."""

    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class StoredImage:
    """An encoded output image as the gateway stored it (hosted URL or data URI)."""

    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int

    def simple(self) -> SimpleImage:
        return SimpleImage(url=self.url, width=self.width, height=self.height, content_type=self.content_type)

    def image(self) -> Image:
        return Image(
            url=self.url,
            content_type=self.content_type,
            file_name=self.file_name,
            file_size=self.file_size,
            width=self.width,
            height=self.height,
        )


@dataclass(frozen=True)
class StoredFile:
    """A non-image output file as the gateway stored it (hosted URL or data URI), e.g. debug latents."""

    url: str
    content_type: str
    file_name: str
    file_size: int

    def file(self) -> File:
        return File(
            url=self.url, content_type=self.content_type, file_name=self.file_name, file_size=self.file_size
        )


Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    # Byte range within the data section (after the header).
    start: int
    end: int


@dataclass(frozen=True)
class WeightsFile:
    """A user weight file accepted as safetensors: the raw bytes and its checked header."""

    data: bytes
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


class InputError(ValueError):
    """A request that parses but cannot be served as asked: answered 422 in fal's `detail` shape.

    `loc` follows FastAPI/fal: ("body", "image_size", "width").
    """

    def __init__(self, loc: tuple[str | int, ...], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
        self.type = type_

    def detail(self) -> dict[str, object]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def resolve_image_size(
    value: ImageSize | str | None, default: tuple[int, int], *, multiple_of: int = 8
) -> tuple[int, int]:
    """(width, height) for an `image_size` field: preset, custom object or the endpoint default.

    Custom sizes must be multiples of 8 (fal's field description says so; the latent grid needs
    it) and at most MAX_OUTPUT_PIXELS in area.
    """
    if value is None:
        return default
    if isinstance(value, str):
        return IMAGE_SIZE_PRESETS[value]
    for name in ("width", "height"):
        if getattr(value, name) % multiple_of:
            raise InputError(
                ("body", "image_size", name),
                f"{name} must be a multiple of {multiple_of}, got {getattr(value, name)}",
            )
    if value.width * value.height > MAX_OUTPUT_PIXELS:
        raise InputError(
            ("body", "image_size"),
            f"{value.width}x{value.height} is larger than this server renders "
            f"({MAX_OUTPUT_PIXELS} pixels, e.g. 2048x2048)",
        )
    return value.width, value.height


def check_url(value: str | None, loc: Loc) -> None:
    """Submit-time check of a URL input: http(s) with a host, or a data: URI. What it points at is
    checked when the job runs (public address, size, format)."""
    if value is None:
        return
    if value.startswith("data:"):
        if "," not in value:
            raise InputError(loc, "malformed data URI: no ',' separator", "invalid_data_uri")
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(loc, "must be an http(s) URL or a data: URI", "url_not_allowed")


def seed_field() -> object:
    return Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="The same seed and the same prompt given to the same version of the model will "
        "output the same image every time. Random when absent; the seed used is returned.",
    )


def media_tensor(arrays: list) -> np.ndarray:
    """(1, m) TYPE_STRING: each array (an image the gateway fetched and decoded, a mask, ...) as a .npy
    blob, for models that take a variable number of inputs (fal-ai/lora's MEDIA; read back with
    ember.pipeline.lora_io.media_array, which never unpickles)."""
    import io

    blobs = []
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        blobs.append(buffer.getvalue())
    return np.array([blobs], dtype=np.object_)
