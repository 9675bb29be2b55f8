"""IC-Light (lllyasviel/IC-Light) relighting on an SD1.5 base, as its gradio_demo.py ("fc") and
gradio_demo_bg.py ("fbc") build it, on the request's base model:

- the UNet's conv_in is widened from 4 to 8 ("fc": foreground-conditioned) or 12 ("fbc": foreground and
  background) input channels, the new ones zero, then every UNet weight gets the IC-Light file's offset added
  (sd_merged = sd_origin + sd_offset). The offset file's channel count says which of the two it is.
- the foreground image (and the background image for fbc), resized and centre-cropped to the output size
  (LANCZOS), scaled with x / 127 - 1 (IC-Light's own, so that 127 is exactly 0), VAE-encoded (the
  distribution's mode, times the VAE scaling factor) are the "concat_conds" (1, 4 | 8, h, w), concatenated
  after the scaled latents on the channel axis at every step: a per-request UNet input (GuidedSlot.unet_feeds)
  of the IC-Light UNet (ember.specs.ic_light.IC_LIGHT_UNET).

Each IC-Light file gets its own patched copy of the base UNet, built from the base model's pristine weights
(the base runner stays untouched, so plain requests are unaffected); at most `capacity` stay resident per
base model (per resident BaseModel: the same directory with another unet_name is another base).

Combined with the other fal-ai/lora inputs (SD1.5 bases; IC-Light files are SD1.5 UNet offsets):
- `loras`: the patched UNet is "base + IC-Light offsets", and the LoRA deltas go on top of it, as they do
  when a LoRA is loaded into IC-Light's own pipeline (its code merges the offsets into the UNet first; the
  reference is diffusers' load_lora_weights + fuse_lora on that pipeline): W = (W0 + offset) + sum s B A,
  fused by the patched UNet's own LoraState (the text encoder's part by the base model's). Switching sets
  restores the patched weights exactly, as the base model's state does for the plain UNet.
- `controlnets`: the patched UNet inside the ControlNet-residual wrapper (ember.specs.controlnet), behind
  IC-Light's concat (ember.specs.ic_light.ConcatConds): the ControlNets see the 4-channel latents, as in
  diffusers' ControlNet pipeline with IC-Light's hooked UNet forward.
- `ip_adapter`: the IP-Adapter UNet (ember.pipeline.ip_adapter) built over the patched UNet's weights,
  behind the same concat.
SDXL bases refuse IC-Light (SD15_ONLY): its offsets fit the SD1.5 UNet only.

Not part of this stage: IC-Light's demo also removes the foreground's background (BRIA RMBG) and runs a
second high-resolution img2img pass; fal's fields name neither, so the foreground is used as sent.

Offset files in diffusers' UNet key names (lllyasviel's own iclight_sd15_fc/fbc.safetensors, which the demo
adds key by key to diffusers' unet.state_dict()) are used as they are; files in the original LDM names
("diffusion_model.input_blocks..." as ComfyUI/Forge ship them) are converted with diffusers' single-file
helper convert_ldm_unet_checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import re
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ember.pipeline.loras import LoraFile, LoraState
from ember.runtime import Runner

# conv_in input channels -> what the IC-Light file conditions on
IC_LIGHT_KINDS = {8: "fc (foreground)", 12: "fbc (foreground and background)"}


# SDXL bases refuse IC-Light for good (its offsets fit the SD1.5 UNet only; there is no SDXL IC-Light)
SD15_ONLY = (
    "ic_light_model_url: IC-Light models are offsets for the SD1.5 UNet (lllyasviel/IC-Light has no SDXL "
    "model), so they cannot run on an SDXL base model; use an SD1.5 model_name"
)

# where the gateway streams offset files (ember.gateway.checkpoints.SUBDIR)
CHECKPOINTS_SUBDIR = "checkpoints"
_STORED_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")  # <sha256>.safetensors


@dataclass(frozen=True)
class IcLightInput:
    """One request's IC-Light: the offset file, either on disk (`path`, as the gateway sends it: stored by
    content, `digest` its sha256 from the name) or in memory (`weights`, safetensors bytes; direct callers),
    the foreground image and, for an "fbc" file, the background image, both (H, W, 3) uint8 RGB."""

    weights: bytes = field(repr=False)
    image: np.ndarray = field(repr=False, compare=False)
    background: np.ndarray | None = field(default=None, repr=False, compare=False)
    digest: str = ""
    path: str = ""

    @staticmethod
    def of(weights: bytes, image: np.ndarray, background: np.ndarray | None = None) -> IcLightInput:
        return IcLightInput(weights, image, background, hashlib.sha256(weights).hexdigest())

    @staticmethod
    def at(path: str | Path, image: np.ndarray, background: np.ndarray | None = None) -> IcLightInput:
        """A stored offset file `<sha256>.safetensors` (its name is its digest: the gateway named it so)."""
        return IcLightInput(b"", image, background, Path(path).stem, str(path))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The offset tensors, read when a patched UNet is built (once per base model and digest)."""
        from safetensors.torch import load, load_file

        return load_file(self.path) if self.path else load(self.weights)


def stored_offset_file(value: Any, root: Path) -> Path:
    """The offset file OPTIONS.ic_light.path names: `<root>/checkpoints/<sha256>.safetensors`, nothing else
    (the directory the gateway streams into). ValueError says why not."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"OPTIONS.ic_light.path = {value!r}: expected the offset file's path")
    path = Path(value).resolve()
    allowed = (root / CHECKPOINTS_SUBDIR).resolve()
    if path.parent != allowed or not _STORED_NAME.fullmatch(path.name):
        raise ValueError(
            f"OPTIONS.ic_light.path: IC-Light files must be <sha256>.safetensors in {allowed} "
            "(the gateway streams ic_light_model_url there)"
        )
    if not path.is_file():
        raise ValueError(
            f"OPTIONS.ic_light.path: {path.name} is not in {allowed} (deleted?); send the URL again"
        )
    return path


def parse_ic_light(entry: Any, root: Path, media: Any) -> IcLightInput | None:
    """OPTIONS "ic_light": {"path": stored offset file, "image": MEDIA index, "background": MEDIA index |
    null} (ember.endpoints.lora.ic_light); `root` is EMBER_LORA_MODEL_ROOT, `media(index, what)` reads a
    MEDIA array. ValueError names the bad part."""
    if entry is None:
        return None
    entry = entry if isinstance(entry, dict) else {}  # anything else has no path: refused below
    path = stored_offset_file(entry.get("path"), root)
    images = []
    for name in ("image", "background"):
        if entry.get(name) is None:
            images.append(None)
            continue
        image = media(entry[name], f"OPTIONS.ic_light.{name}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"OPTIONS.ic_light.{name}: expected an (H, W, 3) uint8 image, got {image.shape}")
        images.append(image)
    if images[0] is None:
        raise ValueError("OPTIONS.ic_light: no foreground image")
    return IcLightInput.at(path, images[0], images[1])


def offsets_in_diffusers_keys(
    tensors: Mapping[str, torch.Tensor], unet_config: Mapping[str, object]
) -> dict[str, torch.Tensor]:
    """The IC-Light offsets keyed like diffusers' UNet2DConditionModel.state_dict()."""
    if "conv_in.weight" in tensors:
        return dict(tensors)
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    def ldm_key(key: str) -> str:  # the helper reads "model.diffusion_model.<ldm name>"
        if key.startswith(LDM_UNET_KEY):
            return key
        return "model." + key if key.startswith("diffusion_model.") else LDM_UNET_KEY + key

    try:
        converted = convert_ldm_unet_checkpoint(
            {ldm_key(k): v for k, v in tensors.items()}, dict(unet_config)
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"not an IC-Light UNet offset file for this base model (LDM key names): {exc}"
        ) from exc
    if "conv_in.weight" not in converted:
        raise ValueError("not an IC-Light UNet offset file: no conv_in weight in diffusers or LDM key names")
    return converted


def patch_unet(
    unet: nn.Module, offsets: Mapping[str, torch.Tensor], pristine: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """A copy of `unet` (diffusers UNet2DConditionModel) with IC-Light's wider conv_in and every weight plus
    its offset; `pristine` replaces some of `unet`'s weights first (the base weights under a fused LoRA set:
    LoraState.pristine). ValueError when the offsets do not fit this UNet (another architecture, missing keys)."""
    channels = int(offsets["conv_in.weight"].shape[1])
    if channels not in IC_LIGHT_KINDS:
        raise ValueError(
            f"an IC-Light conv_in takes 8 (fc) or 12 (fbc) channels, this file's takes {channels}"
        )
    patched = copy.deepcopy(unet)
    if pristine:
        with torch.no_grad():
            state = patched.state_dict()
            for key, value in pristine.items():
                state[key].copy_(value)
    old = patched.conv_in
    wide = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    wide = wide.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : old.in_channels].copy_(old.weight)
        wide.bias.copy_(old.bias)
    patched.conv_in = wide
    state = patched.state_dict()
    missing = sorted(set(state) - set(offsets))
    extra = sorted(set(offsets) - set(state))
    if missing or extra:
        raise ValueError(
            f"IC-Light offsets do not match this base model's UNet: {len(missing)} weight(s) missing "
            f"(e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]}); IC-Light files are for SD1.5"
        )
    merged = {}
    for key, value in state.items():
        offset = offsets[key]
        if offset.shape != value.shape:
            raise ValueError(
                f"IC-Light offset {key} has shape {list(offset.shape)}, the UNet's is {list(value.shape)}"
            )
        merged[key] = (value.float() + offset.to(value.device).float()).to(value.dtype)
    patched.load_state_dict(merged, strict=True)
    return patched.eval()


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """IC-Light's resize_and_center_crop: scale to cover (width, height) with LANCZOS, crop the centre."""
    picture = Image.fromarray(image)
    scale = max(width / picture.width, height / picture.height)
    resized = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS)
    left, top = (resized.width - width) / 2, (resized.height - height) / 2
    return np.array(resized.crop((left, top, left + width, top + height)))


def to_model_range(images: list[np.ndarray]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 as x / 127 - 1 (IC-Light's numpy2pytorch)."""
    return (torch.from_numpy(np.stack(images)).float() / 127.0 - 1.0).movedim(-1, 1)


def unet_part(loras: Any) -> tuple[tuple[LoraFile, float], ...]:
    """A LoRA set's UNet deltas only (the text encoder's are the base model's business)."""
    return tuple(
        (LoraFile(lora.digest, {"unet": lora.factors["unet"]}), scale)
        for lora, scale in loras
        if "unet" in lora.factors
    )


@dataclass
class PatchedUNet:
    """One IC-Light file's patched UNet on one base model: its runner (IcLightUNet), the LoRA set fused into
    it, and the ControlNet-residual runner over the same module (built on first use)."""

    runner: Runner
    loras: LoraState
    controlled: Runner | None = None


class IcLightStage:
    """The lora pipeline's IC-Light step: per base model a VAE encoder (first use) and a patched UNet runner per
    IC-Light file (at most `capacity` resident per base model, least recently used leaves; dropped with the
    base model when it is evicted). Torch runtime only."""

    def __init__(self, settings: Any, capacity: int = 2):
        self.settings = settings
        # resident base model -> offset file digest -> its patched UNet
        self._unets: weakref.WeakKeyDictionary[Any, OrderedDict[str, PatchedUNet]] = (
            weakref.WeakKeyDictionary()
        )
        self._encoders: OrderedDict[str, Runner] = OrderedDict()
        self._capacity = capacity

    def _base(self, model: Any) -> nn.Module:
        sd_unet = getattr(model.unet, "module", None)
        if sd_unet is None or not hasattr(sd_unet, "unet"):
            raise ValueError("ic_light_model_url: IC-Light needs the base model on the torch runtime")
        return sd_unet.unet

    def unet(self, model: Any, ic_light: IcLightInput) -> Runner:
        """The patched UNet runner for this base model and IC-Light file."""
        return self.patched(model, ic_light).runner

    def patched(self, model: Any, ic_light: IcLightInput) -> PatchedUNet:
        """The patched UNet for this base model and IC-Light file, built (first use) from the base UNet's
        pristine weights: whatever LoRA set the base model has fused now does not leak into it."""
        unets = self._unets.setdefault(model, OrderedDict())
        key = ic_light.digest
        entry = unets.get(key)
        if entry is None:
            from ember.runtime.torch_runner import TorchRunner
            from ember.specs.ic_light import IC_LIGHT_UNET, IcLightUNet

            base = self._base(model)
            try:
                tensors = ic_light.tensors()
            except Exception as exc:
                raise ValueError(f"ic_light_model_url: not a safetensors file: {exc}") from exc
            offsets = offsets_in_diffusers_keys(tensors, dict(base.config))
            module = IcLightUNet(patch_unet(base, offsets, model.loras.pristine("unet")))
            runner = TorchRunner(IC_LIGHT_UNET, "", None, str(model.unet.device), base.dtype, module=module)
            # its own LoRA state: deltas on the patched weights, restored to them exactly between sets
            entry = PatchedUNet(runner, LoraState({"unet": runner}, {"unet": runner.weights()}))
            unets[key] = entry
            while len(unets) > self._capacity:
                unets.popitem(last=False)
        unets.move_to_end(key)
        return entry

    def _encoder(self, model: Any) -> Runner:
        runner = self._encoders.get(model.source)
        if runner is None:
            from ember.runtime import torch_dtype
            from ember.runtime.torch_runner import TorchRunner
            from ember.specs.sd15 import VAE_ENCODER

            dtype = torch_dtype(self.settings.dtype)
            runner = TorchRunner(VAE_ENCODER, model.source, None, self.settings.device, dtype)
            self._encoders[model.source] = runner
            while len(self._encoders) > self._capacity:
                self._encoders.popitem(last=False)
        self._encoders.move_to_end(model.source)
        return runner

    def concat_conds(self, model: Any, ic_light: IcLightInput, width: int, height: int) -> torch.Tensor:
        """(1, 4 | 8, h, w): the foreground's (then the background's) scaled VAE latents, channel-stacked."""
        channels = int(self.unet(model, ic_light).module.unet.conv_in.in_channels)  # type: ignore[attr-defined]
        if (channels == 12) != (ic_light.background is not None):
            raise ValueError(
                "ic_light_model_background_image_url: this IC-Light file is "
                + (
                    "'fbc' and needs a background image"
                    if channels == 12
                    else "'fc' (foreground only) and takes no background image"
                )
            )
        images = [fit_image(ic_light.image, width, height)]
        if ic_light.background is not None:
            images.append(fit_image(ic_light.background, width, height))
        mean = self._encoder(model).run({"images": to_model_range(images)})["latent_mean"]  # the mode
        conds = mean * model.vae_scaling_factor  # (1 | 2, 4, h, w)
        return torch.cat(list(conds), dim=0)[None]

    def attach(
        self, model: Any, slots: list, batch: Mapping[int, Any], width: int, height: int
    ) -> dict[int, str]:
        """Each IC-Light request's concat_conds as a UNet input, repeated over its rows (2k with CFG) as
        IC-Light's hooked forward repeats them; {request index: why} for the ones that cannot run."""
        refused = {}
        for slot in slots:
            ic_light = batch[slot.index].ic_light
            if ic_light is None:
                continue
            try:
                conds = self.concat_conds(model, ic_light, width, height)
            except ValueError as exc:
                refused[slot.index] = str(exc)
                continue
            slot.unet_feeds["concat_conds"] = conds.expand(slot.rows, -1, -1, -1).to(model.unet.device)
        return refused

    def denoiser(self, model: Any, request: Any, controlled: Any, ip_adapters: Any) -> Runner:
        """The UNet runner of a batch with IC-Light (one file, one LoRA set and one IP-Adapter set per batch:
        lora._batch_key; `request` its first LoraRequest): the patched UNet with the set's UNet deltas fused,
        taking ControlNet residuals when `controlled` (the batch's guided_denoise.Controlled) is set, or the
        IP-Adapter UNet the IP stage (`ip_adapters`, ember.pipeline.ip_adapter.IPAdapterStage) builds over
        its weights; each behind IC-Light's concat (concat_conds its last input). ValueError naming the
        field ("loras: ...", "ip_adapter: ...") when the batch cannot run on it."""
        from ember.runtime.torch_runner import TorchRunner
        from ember.specs.controlnet import CONTROLLED_UNET, ControlledUNet
        from ember.specs.ic_light import ConcatConds, with_concat_conds

        entry = self.patched(model, request.ic_light)
        deltas = unet_part(request.loras)
        problems = entry.loras.problems(deltas)
        if problems:
            raise ValueError("loras: " + "; ".join(problems) + " (with IC-Light's patched UNet)")
        entry.loras.apply(deltas)
        patched = entry.runner
        unet = patched.module.unet  # type: ignore[attr-defined]  # the patched diffusers UNet
        device, dtype = str(patched.device), unet.dtype
        if request.ip_adapter is not None:  # built per batch (its scales are the batch's), as IP's own
            inner = ip_adapters.denoiser(patched, patched, controlled, request.ip_adapter)
            if not isinstance(inner, TorchRunner):
                raise ValueError("ip_adapter: with IC-Light it needs the torch runtime")
            spec, module = with_concat_conds(inner.spec), ConcatConds(inner.module)
            return TorchRunner(spec, "", None, device, dtype, module=module, warmup=())
        if controlled is None:
            return patched
        if entry.controlled is None:
            module = ConcatConds(ControlledUNet(unet))
            entry.controlled = TorchRunner(
                with_concat_conds(CONTROLLED_UNET), "", None, device, dtype, module=module, warmup=()
            )
        return entry.controlled
