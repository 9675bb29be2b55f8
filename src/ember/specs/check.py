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
    found += _sote_problems(model_repository)
    found += _pixart_problems(model_repository)
    found += _lora_problems(model_repository)
    found += _illusion_problems(model_repository)
    return found


def _sote_problems(model_repository: Path) -> list[str]:
    """sote_diffusion: config.pbtxt == sote_io's names == the tensors the gateway's translate sends."""
    from ember.endpoints.sote_diffusion.schema import SoteDiffusionInput
    from ember.endpoints.sote_diffusion.translate import SoteDiffusionEndpoint
    from ember.pipeline.sote_io import INPUT_NAMES as SOTE_INPUTS
    from ember.pipeline.sote_io import OUTPUT_NAMES as SOTE_OUTPUTS
    from ember.specs.stable_cascade import STABLE_CASCADE_NETWORKS

    found = []
    config = (model_repository / "sote_diffusion" / "config.pbtxt").read_text(encoding="utf-8")
    if sorted(_names(config, "input")) != sorted(SOTE_INPUTS):
        found.append(f"sote_diffusion inputs {_names(config, 'input')} != sote_io.INPUT_NAMES {list(SOTE_INPUTS)}")
    if sorted(_names(config, "output")) != sorted(SOTE_OUTPUTS):
        found.append(f"sote_diffusion outputs {_names(config, 'output')} != {list(SOTE_OUTPUTS)}")
    sent = SoteDiffusionEndpoint().to_triton(SoteDiffusionInput(prompt="x"), seed=0)
    if sorted(sent) != sorted(SOTE_INPUTS):
        found.append(f"the sote_diffusion endpoint sends {sorted(sent)}, the model reads {sorted(SOTE_INPUTS)}")
    for spec in STABLE_CASCADE_NETWORKS:
        names = spec.input_names + spec.output_names
        if len(set(names)) != len(names):
            found.append(f"spec {spec.name} repeats a tensor name: {names}")
    return found


def _pixart_problems(model_repository: Path) -> list[str]:
    """pixart_sigma: config.pbtxt == pixart_io's names == the tensors the gateway's translate sends."""
    from ember.endpoints.pixart_sigma.schema import PixArtSigmaInput
    from ember.endpoints.pixart_sigma.translate import PixArtSigmaEndpoint
    from ember.pipeline.pixart_io import INPUT_NAMES as PIXART_INPUTS
    from ember.pipeline.pixart_io import OUTPUT_NAMES as PIXART_OUTPUTS
    from ember.specs.pixart_sigma import PIXART_SIGMA_NETWORKS

    found = []
    config = (model_repository / "pixart_sigma" / "config.pbtxt").read_text(encoding="utf-8")
    if sorted(_names(config, "input")) != sorted(PIXART_INPUTS):
        found.append(f"pixart_sigma inputs {_names(config, 'input')} != pixart_io.INPUT_NAMES {list(PIXART_INPUTS)}")
    if sorted(_names(config, "output")) != sorted(PIXART_OUTPUTS):
        found.append(f"pixart_sigma outputs {_names(config, 'output')} != {list(PIXART_OUTPUTS)}")
    sent = PixArtSigmaEndpoint().to_triton(PixArtSigmaInput(prompt="x"), seed=0)
    if sorted(sent) != sorted(PIXART_INPUTS):
        found.append(f"the pixart-sigma endpoint sends {sorted(sent)}, the model reads {sorted(PIXART_INPUTS)}")
    for spec in PIXART_SIGMA_NETWORKS:
        names = spec.input_names + spec.output_names
        if len(set(names)) != len(names):
            found.append(f"spec {spec.name} repeats a tensor name: {names}")
    return found


def _lora_problems(model_repository: Path) -> list[str]:
    """lora: config.pbtxt == lora_io's names; the gateway's translate sends only names the model reads
    (LORA_FILES only when there are LoRAs, MEDIA only with images), and every one it must."""
    from ember.endpoints.lora.schema import LoraInput
    from ember.endpoints.lora.translate import LoraEndpoint
    from ember.pipeline.lora_io import INPUT_NAMES as LORA_INPUTS
    from ember.pipeline.lora_io import OUTPUT_NAMES as LORA_OUTPUTS
    from ember.specs.lora import SD15_LORA_NETWORKS

    found = []
    config = (model_repository / "lora" / "config.pbtxt").read_text(encoding="utf-8")
    if sorted(_names(config, "input")) != sorted(LORA_INPUTS):
        found.append(f"lora inputs {_names(config, 'input')} != lora_io.INPUT_NAMES {list(LORA_INPUTS)}")
    if sorted(_names(config, "output")) != sorted(LORA_OUTPUTS):
        found.append(f"lora outputs {_names(config, 'output')} != {list(LORA_OUTPUTS)}")
    inp = LoraInput(model_name="a/b", prompt="x", loras=[{"path": "https://h/l.safetensors"}])
    sent = LoraEndpoint().to_triton(inp, seed=0, loaded={"lora_files": [b""]})
    # MEDIA only travels when the request names images (control images, IP-Adapter images, ...)
    if sorted(set(sent) | {"MEDIA"}) != sorted(LORA_INPUTS):
        found.append(f"the lora endpoint sends {sorted(sent)}, the model reads {sorted(LORA_INPUTS)}")
    for spec in SD15_LORA_NETWORKS:
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


def _illusion_problems(model_repository: Path) -> list[str]:
    """illusion_diffusion: config.pbtxt == illusion_io's names ⊇ the tensors the gateway's translate sends."""
    import numpy as np

    from ember.endpoints.illusion_diffusion.schema import IllusionDiffusionInput
    from ember.endpoints.illusion_diffusion.translate import IllusionDiffusionEndpoint
    from ember.pipeline.illusion_io import INPUT_NAMES as ILLUSION_INPUTS
    from ember.pipeline.illusion_io import OUTPUT_NAMES as ILLUSION_OUTPUTS
    from ember.specs.controlnet import CONTROLNET_NETWORKS, SD15_CONTROLLED_NETWORKS

    found = []
    config = (model_repository / "illusion_diffusion" / "config.pbtxt").read_text(encoding="utf-8")
    inputs, outputs = _names(config, "input"), _names(config, "output")
    if sorted(inputs) != sorted(ILLUSION_INPUTS):
        found.append(f"illusion_diffusion inputs {inputs} != illusion_io.INPUT_NAMES {list(ILLUSION_INPUTS)}")
    if sorted(outputs) != sorted(ILLUSION_OUTPUTS):
        found.append(f"illusion_diffusion outputs {outputs} != illusion_io.OUTPUT_NAMES {list(ILLUSION_OUTPUTS)}")
    sample = IllusionDiffusionInput(image_url="data:image/png;base64,AA", prompt="x")
    sent = IllusionDiffusionEndpoint().to_triton(sample, 0, {"image": np.zeros((8, 8, 3), np.uint8)})
    if set(sent) - set(inputs):
        found.append(f"illusion_diffusion translate sends {sorted(set(sent) - set(inputs))}, not in config.pbtxt")
    for spec in (*SD15_CONTROLLED_NETWORKS, *CONTROLNET_NETWORKS):
        names = spec.input_names + spec.output_names
        if len(set(names)) != len(names):
            found.append(f"spec {spec.name} repeats a tensor name: {names}")
    return found


if __name__ == "__main__":
    main()
