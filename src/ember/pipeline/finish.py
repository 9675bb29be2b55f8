"""The end of every batch, shared by the endpoint pipelines: finished slots' images split back per request,
the safety checker on the requests that asked for it, and one result per request with the batch's timings.

    pixels = split_per_request(done, to_uint8(images))      # {request index: (k, H, W, 3) uint8}
    nsfw = check_safety(pixels, wants_check, checker)        # flagged images blacked out in `pixels`
    results = collect_results(batch, pixels, nsfw, timings)  # cancelled requests: images None
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from ember.pipeline.requests import Text2ImageResult


class _Finished(Protocol):
    index: int
    latents: torch.Tensor  # (k, C, h, w): k images of one request


def split_per_request(done: Sequence[_Finished], images: torch.Tensor) -> dict[int, torch.Tensor]:
    """(sum k, ...) images decoded for `done` in one batch -> {request index: its k images}."""
    per_request = images.split([slot.latents.shape[0] for slot in done])
    return {slot.index: part for slot, part in zip(done, per_request, strict=True)}


def check_safety(
    pixels: dict[int, torch.Tensor],
    wants_check: Callable[[int], bool],
    checker: Callable[[torch.Tensor], tuple[torch.Tensor, list[bool]]] | None,
) -> dict[int, list[bool]]:
    """One flag per image; requests that asked (and only when a checker is loaded) go through it, and
    their flagged images are replaced in `pixels` by black ones, as diffusers' pipelines do."""
    nsfw: dict[int, list[bool]] = {}
    for index, images in pixels.items():
        if checker is not None and wants_check(index):
            pixels[index], nsfw[index] = checker(images)
        else:
            nsfw[index] = [False] * images.shape[0]
    return nsfw


def collect_results(
    indices: Iterable[int],
    pixels: dict[int, torch.Tensor],
    nsfw: dict[int, list[bool]],
    timings: dict[str, float],
) -> dict[int, Text2ImageResult]:
    """A result per request index: its images and flags, or cancelled when it has no images (it left
    the batch during denoising). Each gets its own copy of the batch's stage timings."""
    results = {}
    for index in indices:
        if index in pixels:
            results[index] = Text2ImageResult(pixels[index], nsfw[index], dict(timings))
        else:
            results[index] = Text2ImageResult(None, [], dict(timings), cancelled=True)
    return results
