"""Build the demo model if needed and export every network of a model to ONNX, verified against torch.

    python -m export.onnx                      # lcm/sdv1-5 with the settings from the environment
    python -m export.onnx --family lcm --variant sdv1-5

Prints the artifact directory. Exports are cached (see ember.specs.artifacts); a second run is instant.
"""

from __future__ import annotations

import argparse
import dataclasses

from ember.settings import get_settings
from ember.specs import ensure_artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="lcm")
    parser.add_argument("--variant", default="sdv1-5")
    args = parser.parse_args()
    settings = get_settings()
    if settings.runtime == "torch":  # the torch runtime skips ONNX; this tool is asked for it explicitly
        settings = dataclasses.replace(settings, runtime="onnxruntime", models=settings.models)
    print(ensure_artifacts(settings, family=args.family, variant=args.variant, progress=True))


if __name__ == "__main__":
    main()
