"""fal-ai/lcm `controlnet_inpaint` (SD1.5): inpainting with the LCM UNet steered by an inpaint ControlNet
(lllyasviel/control_v11p_sd15_inpaint), the networks loaded on first use.

The reference is diffusers' StableDiffusionControlNetInpaintPipeline with unet = the LCM UNet, LCMScheduler
and controlnet = the inpaint ControlNet. For a 4-channel UNet it runs exactly plain lcm inpainting
(strength-cut timesteps, the known region re-imposed after every step: ember.pipeline.denoise.InpaintBlend,
the same generator draws), plus per step the ControlNet's residuals added to the UNet's skip connections,
with the control image = the input image in [0, 1] whose masked pixels are -1 (diffusers' docs,
`make_inpaint_condition`). So it reuses lcm_denoise with a `controlled` UNet, not a loop of its own.

One deliberate difference from that pipeline: it never computes the guidance embedding an LCM UNet takes
(no timestep_cond; it predates LCM UNets, while its text-to-image sibling StableDiffusionControlNetPipeline
does compute it and then skips classifier-free guidance). There, guidance_scale > 1 would switch on classic
CFG with the negative prompt over a UNet distilled to take guidance as an embedding. Here the UNet gets its
guidance embedding and no CFG, as in every other lcm mode; the parity tests hand the reference the same
embedding through a UNet forward hook. The ControlNet takes no timestep_cond (SD1.5 ControlNets have no
time_cond_proj_dim; diffusers passes none).

Why lazily: requests without controlnet_inpaint (the realtime 512 px path among them) keep the plain UNet
and never see these networks; the first controlnet_inpaint request pays their session set-up (the exports
are built ahead by the launcher: ember.serve SHARED_STAGES and the lcm family's `controlled_unet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.pipeline.controlnet import ControlNetUnit, control_image
from ember.pipeline.guided_denoise import Controlled
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts
from ember.specs.controlnet import residual_layout

# The models.toml entry of the inpaint ControlNet.
INPAINT_CONTROLNET = ("controlnet", "inpaint-sd15")
# fal-ai/lcm exposes no conditioning scale: StableDiffusionControlNetInpaintPipeline's default, 0.5 (its
# text-to-image sibling defaults to 1.0), over the whole schedule (start 0, end 1).
CONDITIONING_SCALE = 0.5


def inpaint_condition(image: np.ndarray, fill: torch.Tensor) -> torch.Tensor:
    """The inpaint ControlNet's control image (1, 3, H, W): `image` (H0, W0, 3) uint8 resized to the mask's
    size (Lanczos, values in [0, 1]) with every pixel to fill set to -1. `fill` is the request's mask as
    the pipeline uses it, (1, 1, H, W) in {0, 1} (ImagePreprocessor.mask_tensor), so the ControlNet sees
    -1 exactly where the UNet's known region is not re-imposed."""
    height, width = fill.shape[-2:]
    return torch.where(fill > 0.5, -1.0, control_image(image, width, height))


@dataclass(frozen=True)
class InpaintControl:
    """The networks of controlnet_inpaint."""

    unet: Runner  # the LCM UNet taking residuals (ember.specs.controlnet.CONTROLLED_LCM_UNET)
    controlnet: Runner  # the inpaint ControlNet (ember.specs.controlnet.CONTROLNET)
    controlled: Controlled  # sizes the zero residuals (unused here: every row has its unit)

    def units(self, image: np.ndarray, fill: torch.Tensor) -> tuple[ControlNetUnit, ...]:
        """One request's conditioning: the inpaint ControlNet at CONDITIONING_SCALE, every step."""
        return (ControlNetUnit(self.controlnet, inpaint_condition(image, fill), scale=CONDITIONING_SCALE),)


class InpaintControlLoader:
    """Creates the controlnet_inpaint runners on its first call and returns the same ones afterwards.

    `base` is the lcm SD1.5 artifact directory (its `controlled_unet` export); the ControlNet's artifacts
    come from models.toml [controlnet.inpaint-sd15], built here if the launcher has not built them.
    """

    def __init__(self, settings: Settings, base: Artifacts):
        self.settings, self.base = settings, base
        self._loaded: InpaintControl | None = None

    def __call__(self) -> InpaintControl:
        if self._loaded is None:
            from ember.specs.artifacts import ensure_artifacts

            controlnet = read_artifacts(ensure_artifacts(self.settings, *INPAINT_CONTROLNET, progress=False))
            unet_config = self.base.config("unet")
            if residual_layout(controlnet.config("")) != residual_layout(unet_config):
                raise ValueError(
                    f"the inpaint ControlNet {controlnet.source} does not fit the LCM UNet {self.base.source} "
                    "(different block widths): name an SD1.5 inpaint ControlNet in models.toml "
                    f"[{'.'.join(INPAINT_CONTROLNET)}]"
                )
            key = self.base.manifest["key"]
            specs = {s.name: s for s in family_spec(key["family"], key["variant"]).load_networks()}
            (controlnet_spec,) = family_spec(*INPAINT_CONTROLNET).load_networks()
            self._loaded = InpaintControl(
                # refittable: lora_url fuses the LoRA's UNet part into it too (LcmLoras.apply_controlled)
                unet=create_runner(self.settings, self.base, specs["controlled_unet"], refittable=True),
                controlnet=create_runner(self.settings, controlnet, controlnet_spec),
                controlled=Controlled(unet_config),
            )
        return self._loaded
