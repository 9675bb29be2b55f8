"""The Runner interface over real exports and modules: the runtimes agree, refit works where implemented."""

from __future__ import annotations

import pytest
import torch

from ember.runtime import RefitNotSupportedError, create_runner
from ember.specs.sd15 import UNET
from tests.pipeline.conftest import tiny_settings


@pytest.fixture(scope="module")
def unet_feeds(lcm_artifacts) -> dict[str, torch.Tensor]:
    return UNET.sample_inputs(lcm_artifacts.config("unet"), batch=2, height=64, width=96)


def test_onnxruntime_and_torch_runners_agree(var_dir, lcm_settings, lcm_artifacts, unet_feeds) -> None:
    ort_unet = create_runner(lcm_settings, lcm_artifacts, UNET)
    torch_unet = create_runner(tiny_settings(var_dir, EMBER_RUNTIME="torch"), lcm_artifacts, UNET)
    a, b = ort_unet.run(unet_feeds)["noise_pred"], torch_unet.run(unet_feeds)["noise_pred"]
    assert a.shape == b.shape == (2, 4, 8, 12) and a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max() < 1e-3  # the export tolerance (ember.specs.onnx_export.VERIFY_ATOL)


def test_onnxruntime_refit_needs_a_refittable_runner(lcm_settings, lcm_artifacts) -> None:
    """Refit works on runners created refittable (tests/pipeline/test_ort_refit.py); the others keep ORT's
    constant-weight optimizations and say how to get one."""
    runner = create_runner(lcm_settings, lcm_artifacts, UNET)
    with pytest.raises(RefitNotSupportedError, match="built without refittable=True"):
        runner.refit({})


def test_torch_refit_swaps_weights_in_place(var_dir, lcm_artifacts, unet_feeds) -> None:
    runner = create_runner(tiny_settings(var_dir, EMBER_RUNTIME="torch"), lcm_artifacts, UNET)
    before = runner.run(unet_feeds)["noise_pred"]
    runner.refit({"conv_out.bias": torch.ones(4)})  # diffusers' own state-dict names
    after = runner.run(unet_feeds)["noise_pred"]
    assert not torch.allclose(before, after)
    with pytest.raises(KeyError, match="no weights named"):
        runner.refit({"not.a.weight": torch.ones(1)})
