"""Runtime pieces that need no model: dtype names and the TensorRT runtime's availability."""

from __future__ import annotations

import pytest
import torch

from ember.runtime import torch_dtype
from ember.runtime.tensorrt_runner import tensorrt_available


def test_dtype_names() -> None:
    assert torch_dtype("float16") is torch.float16 and torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="EMBER_DTYPE"):
        torch_dtype("fp8")


@pytest.mark.skipif(
    not (tensorrt_available() and torch.cuda.is_available()),
    reason="TensorRT not installed" if not tensorrt_available() else "TensorRT needs a CUDA GPU",
)
def test_tensorrt_engine_refuses_a_missing_plan(tmp_path) -> None:
    from ember.runtime.tensorrt_runner import TensorRTEngine
    from ember.specs.base import fal_buckets
    from ember.specs.sd15 import UNET

    with pytest.raises(FileNotFoundError, match="no TensorRT engine"):
        TensorRTEngine(UNET, tmp_path / "unet.plan", fal_buckets())


def test_tensorrt_says_when_it_is_absent(tmp_path) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    from ember.runtime.tensorrt_build import require_tensorrt
    from ember.runtime.tensorrt_runner import TensorRTEngine
    from ember.specs.base import fal_buckets
    from ember.specs.sd15 import UNET

    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        TensorRTEngine(UNET, tmp_path / "unet.plan", fal_buckets())
    with pytest.raises(RuntimeError, match="NGC Triton image"):
        require_tensorrt()
