"""The tritonclient example in client/ against the stack's Triton, no gateway in between."""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import pytest

from tests.contract.conftest import REPO

pytestmark = pytest.mark.e2e


def _example():
    spec = importlib.util.spec_from_file_location("triton_grpc_example", REPO / "client" / "triton_grpc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_direct_grpc_streams_progress_then_images(stack) -> None:
    example = _example()
    url = stack.settings.triton_grpc_url
    out = asyncio.run(example.generate(url, "a black cat", seed=5, steps=3, width=128, height=64))
    assert out["progress"] == [[1, 3], [2, 3], [3, 3]]
    assert out["images"].shape == (1, 64, 128, 3) and out["images"].dtype == np.uint8
    assert out["nsfw"] == [False]
    again = asyncio.run(example.generate(url, "a black cat", seed=5, steps=3, width=128, height=64))
    assert np.array_equal(out["images"], again["images"])


def test_concurrent_grpc_requests_are_batched_and_equal_singles(stack) -> None:
    """Dynamic batching must not change any request's pixels (batch of N == N singles)."""
    example = _example()
    url = stack.settings.triton_grpc_url
    seeds = [11, 12, 13, 14]

    async def many():
        return await asyncio.gather(*(example.generate(url, "a boat", s, 2, 64, 64) for s in seeds))

    together = asyncio.run(many())
    for seed, out in zip(seeds, together):
        single = asyncio.run(example.generate(url, "a boat", seed, 2, 64, 64))
        np.testing.assert_allclose(out["images"].astype(int), single["images"].astype(int), atol=1)


def test_direct_grpc_inpainting_with_typed_image_and_mask(stack) -> None:
    """IMAGE / MASK / STRENGTH tensors: inpainting without the gateway; the output takes the image's size."""
    example = _example()
    yy, xx = np.mgrid[0:80, 0:120]
    image = np.stack([xx * 2, yy * 3, np.full_like(xx, 60)], -1).astype(np.uint8)
    mask = np.zeros((80, 120), np.uint8)
    mask[20:60, 30:90] = 255
    out = asyncio.run(
        example.generate(stack.settings.triton_grpc_url, "a door", 3, 4, None, None, image=image, mask=mask,
                         strength=0.5)
    )
    assert out["progress"] == [[1, 2], [2, 2]]  # inpainting walks int(4 x 0.5) steps
    assert out["images"].shape == (1, 80, 120, 3) and out["nsfw"] == [False]
