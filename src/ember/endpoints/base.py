"""What an endpoint is to the gateway: its fal schema, its Triton model, and the translation
between the two (STYLE.md 1). The gateway knows nothing else about an endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

import numpy as np
from pydantic import BaseModel

from ember.endpoints.common import StoredImage

TritonTensors = dict[str, np.ndarray]
# Encodes one (H, W, 3) uint8 image in the given format ("jpeg" | "png") and stores it.
ImageSink = Callable[[np.ndarray, str], Awaitable[StoredImage]]

In = TypeVar("In", bound=BaseModel)


def bytes_tensor(value: str) -> np.ndarray:
    """A (1, 1) TYPE_STRING tensor: batch of one request, one element."""
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def scalar_tensor(value: float | int | bool, dtype: type) -> np.ndarray:
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

    @abstractmethod
    def to_triton(self, inp: In, seed: int) -> TritonTensors:
        """The Triton model's input tensors, each with a leading batch dimension of 1."""

    @abstractmethod
    async def to_output(self, inp: In, seed: int, outputs: TritonTensors, store: ImageSink) -> BaseModel:
        """The fal output from the model's final response; images go through `store`."""
