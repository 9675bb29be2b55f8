"""`make check`: fail when a Triton model's config.pbtxt drifts from the code that fills its tensors.

Today the networks run inside the endpoint model (no per-network Triton models yet), so what can drift is
the endpoint contract: the input names model.py reads and the output names it writes. Each NetworkSpec
must also name its tensors uniquely, since runners key them by name.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ember.pipeline.lcm_io import INPUT_NAMES
from ember.specs.sd15 import SD15_LCM_NETWORKS

LCM_OUTPUTS = ("IMAGES", "NSFW", "PROGRESS", "TIMINGS")


def _names(config: str, section: str) -> list[str]:
    block = re.search(rf"^{section}\s*\[(.*?)^\]", config, re.DOTALL | re.MULTILINE)
    return re.findall(r'name:\s*"([^"]+)"', block.group(1)) if block else []


def problems(model_repository: Path) -> list[str]:
    found = []
    config = (model_repository / "lcm" / "config.pbtxt").read_text(encoding="utf-8")
    if sorted(_names(config, "input")) != sorted(INPUT_NAMES):
        found.append(
            f"lcm inputs {_names(config, 'input')} != ember.pipeline.lcm_io.INPUT_NAMES {list(INPUT_NAMES)}"
        )
    if sorted(_names(config, "output")) != sorted(LCM_OUTPUTS):
        found.append(f"lcm outputs {_names(config, 'output')} != {list(LCM_OUTPUTS)}")
    for spec in SD15_LCM_NETWORKS:
        names = spec.input_names + spec.output_names
        if len(set(names)) != len(names):
            found.append(f"spec {spec.name} repeats a tensor name: {names}")
    return found


def main() -> None:
    from ember.settings import get_settings

    found = problems(get_settings().model_repository)
    for problem in found:
        print(f"configs out of sync: {problem}", file=sys.stderr)
    if found:
        sys.exit(1)
    print("configs in sync")


if __name__ == "__main__":
    main()
