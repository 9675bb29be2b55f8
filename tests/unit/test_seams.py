"""The router/server seam (STYLE.md "The shape of the project"): the gateway never imports torch,
the pipeline never imports FastAPI. Checked in fresh interpreters so other tests' imports don't hide it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize("module", ["ember.gateway.app", "ember.endpoints.registry"])
def test_gateway_side_never_imports_torch(module: str) -> None:
    loaded = _imported_after(module)
    assert not loaded & {"torch", "diffusers", "transformers", "onnxruntime"}


@pytest.mark.parametrize("module", ["ember.pipeline", "ember.runtime"])
def test_pipeline_side_never_imports_the_web_stack(module: str) -> None:
    loaded = _imported_after(module)
    assert not loaded & {"fastapi", "starlette", "uvicorn"}
