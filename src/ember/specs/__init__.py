"""One spec per exported network, the ONNX exporter that consumes them, and the export cache.

The entry point for launchers and for the Triton model is `ensure_artifacts(settings, family, variant)`.
Heavy imports (torch, diffusers) happen inside the functions that need them.
"""

from ember.specs.artifacts import Artifacts, ensure_artifacts, read_artifacts

__all__ = ["Artifacts", "ensure_artifacts", "read_artifacts"]
