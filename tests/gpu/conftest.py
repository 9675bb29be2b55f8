"""The GPU tier: runs only with RUN_GPU=1 on a machine with CUDA (make test-gpu); skipped otherwise."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RUN_GPU") == "1" and torch.cuda.is_available():
        return
    reason = (
        "GPU tier: set RUN_GPU=1 on a CUDA machine" if os.environ.get("RUN_GPU") != "1" else "no CUDA device"
    )
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


# The tiny LCM exports, shared with the pipeline tier.
from tests.pipeline.conftest import lcm_artifacts, lcm_settings  # noqa: F401
