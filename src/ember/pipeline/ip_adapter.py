"""IP-Adapter image prompts for fal-ai/lora, as diffusers' StableDiffusionPipeline (SD1.5 bases) and
StableDiffusionXLPipeline (SDXL bases) run them after `load_ip_adapter` + `set_ip_adapter_scale` with
`ip_adapter_image` (and `cross_attention_kwargs={"ip_adapter_masks": ...}` from IPAdapterMaskProcessor for
masks):

1. Image encoder stage: each adapter's image(s) -> CLIPImageProcessor -> CLIPVisionModelWithProjection
   (ember.specs.image_encoder). Plain IP-Adapters take the projected `image_embeds` (n, P) with zeros as
   the unconditional embeds; Plus / Full Face take the penultimate hidden states (n, T, Dv), unconditional
   = the encoder's hidden states of an all-zero image. Rows follow the slot's prompt rows:
   [uncond x k; cond x k] with classifier-free guidance, [cond x k] without -> (rows, n, ...).
   fal's `unconditional_noising_factor` f > 0 replaces the unconditional input by noise, as fal's own
   text-to-image app defines it (fal-ai/text-to-image's pipeline `encode_image`, public in the
   okaris/fal-text-to-image history, commit 7b9892b): the unconditional image is `rand_like(pixel_values)
   * f` (uniform [0, f) in the CLIP-preprocessed pixel space, one per image), encoded by the same encoder
   (plain: its image_embeds, Plus: its penultimate hidden states). fal draws it from torch's global RNG;
   here from a CPU generator seeded with the request's seed, so a seed gives the same image. At f = 0
   diffusers' unconditional embeds stay (fal's code would give plain adapters encoder(zero image) there).
2. IP UNet: a copy of the base model's torch UNet module whose parameters ARE the base UNet's (same
   tensors: LoRA refits reach it, no second copy of the weights), into which diffusers' own
   load_ip_adapter installs the image projection (encoder_hid_proj) and the IP attention processors
   (to_k_ip / to_v_ip). The base UNet module is never touched, so requests without IP-Adapter run
   exactly as before. The UNet is then called with added_cond_kwargs={"image_embeds": [...]}; an SDXL
   UNet also gets its "text_time" conditions there (text_embeds (B, P), time_ids (B, 6): the slot's
   unet_feeds from ember.pipeline.lora_xl, beside the image embeds). An adapter trained for the other
   family (SD1.5's cross-attention width 768 vs SDXL's 2048) is refused before loading, naming ip_adapter.

Requests run in one network batch only when they share the IP-Adapter set (weights, scales, the number of
images per adapter and which adapters are masked): the attention processors hold one scale per adapter.
Images and masks are per request rows, so such a batch may still mix different images and masks.

Runs on the torch runtime only: ONNX / TensorRT export of IP-Adapter UNets is not done (the image tokens
would be extra engine inputs per adapter count; a later issue).

FaceID adapters (h94/IP-Adapter-FaceID, served from .safetensors saves of the same weights) run as diffusers'
FaceID recipe does: each image's largest face -> ArcFace's normalised 512-d embedding (ember.pipeline.
face_analysis, from the request's InsightFace model pack: fal's insight_face_model_path) -> fed as
`ip_adapter_image_embeds` (rows [zeros x k; embeds x k] with CFG, (rows, n, 512)). FaceID Plus v1 / v2
also take the CLIP image encoder's penultimate hidden states of the face aligned to 224x224 (norm_crop) as
the projection's `clip_embeds` (unconditional: those of an all-zero image, as prepare_ip_adapter_image_embeds)
and its `shortcut` from fal's image_projection_shortcut (v1: False, v2: True); both are IP UNet inputs /
per-batch settings here, not module state left behind. A FaceID checkpoint's attention LoRA (to_*_lora) is
loaded by diffusers' load_ip_adapter into the IP UNet copy only (peft layers over the shared weights).
unconditional_noising_factor acts on the CLIP part of FaceID Plus only (a face embedding has no image).

InstantID's adapter (InstantX/InstantID ip-adapter.bin) has IP-Adapter Plus's layout (a Resampler:
image_proj.latents / proj_in / layers / proj_out / norm_out) whose proj_in takes the 512-d face embedding
instead of CLIP hidden states. Such an adapter sent with insight_face_model_path runs on the face: its image
embeds are the ArcFace embeddings as one token each, (rows, n, 1, 512), zeros for the unconditional rows
(InstantID's pipeline: cat([zeros_like(emb), emb]) before the projection); no CLIP encoder runs for it.
fal's controlnets[i].ip_adapter_index feeds its projected tokens to IdentityNet (ember.pipeline.instantid).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ember.pipeline.face_analysis import PACKS, NoFaceError, norm_crop, unpack
from ember.pipeline.guided_denoise import GuidedSlot
from ember.runtime import Runner, torch_dtype
from ember.settings import Settings
from ember.specs.base import TensorSpec
from ember.specs.controlnet import CONTROLLED_UNET
from ember.specs.controlnet_xl import XL_CONTROLLED_UNET
from ember.specs.image_encoder import DEFAULT_WEIGHT_NAME, bind_image_encoder
from ember.specs.lora import UNET
from ember.specs.sdxl import UNET as XL_UNET

# Where InsightFace model pack .zips are unpacked, one directory per content sha256, under the model root
# (beside the gateway's checkpoint store, which holds the .zips of pack URLs).
PACK_CACHE = Path("checkpoints") / "insightface-packs"
FACE_EMBEDDING = 512  # ArcFace's embedding width: what an InstantID-style Resampler's proj_in takes

# MEDIA reader: (index, what) -> the array the gateway sent (lora_io.media_array bound to one request).
MediaReader = Callable[[Any, str], np.ndarray]


@dataclass(frozen=True)
class IPAdapterWeights:
    """One IP-Adapter checkpoint in diffusers' format: {"image_proj": {...}, "ip_adapter": {...}}."""

    digest: str  # sha256 of the file: the cache and batch key
    state: Mapping[str, Mapping[str, torch.Tensor]] = field(compare=False, repr=False)

    @property
    def plain(self) -> bool:
        """A plain IP-Adapter (diffusers' ImageProjection) projects `image_embeds`; the others (Plus,
        Full Face) take the image encoder's penultimate hidden states."""
        return "proj.weight" in self.state["image_proj"]

    @property
    def face(self) -> str | None:
        """FaceID kind: "faceid" (IPAdapterFaceIDImageProjection: face embedding -> tokens), "faceid_plus"
        (IPAdapterFaceIDPlusImageProjection: + CLIP embeds of the aligned face), None for CLIP-image
        adapters; diffusers' own tests of the image_proj keys (loaders/unet.py)."""
        proj = self.state["image_proj"]
        if "perceiver_resampler.proj_in.weight" in proj:
            return "faceid_plus"
        if "norm.weight" in proj and "proj.weight" not in proj and "proj.3.weight" not in proj:
            return "faceid"
        return None

    @property
    def uses_encoder(self) -> bool:
        """Whether the CLIP image encoder runs for it (all but plain FaceID)."""
        return self.face != "faceid"

    @property
    def face_resampler(self) -> bool:
        """IP-Adapter Plus's Resampler taking 512-wide inputs: InstantID's adapter, run on the ArcFace
        embedding when insight_face_model_path is given (module docstring)."""
        proj = self.state["image_proj"]
        return "latents" in proj and self.face is None and self.embed_width == FACE_EMBEDDING

    @property
    def cross_attention_dim(self) -> int | None:
        """The UNet cross-attention width its to_k_ip / to_v_ip layers take (SD1.5: 768, SDXL: 2048)."""
        for key, value in self.state["ip_adapter"].items():
            if key.endswith("to_k_ip.weight"):
                return int(value.shape[-1])
        return None

    @property
    def embed_width(self) -> int | None:
        """The image-encoder output width its projection takes (P for plain, Dv for Plus / Full Face)."""
        if self.face == "faceid_plus":  # its proj.0 takes the face embedding; the CLIP width is proj_in's
            return int(self.state["image_proj"]["perceiver_resampler.proj_in.weight"].shape[-1])
        for key in ("proj.weight", "proj_in.weight", "proj.0.weight"):
            if key in self.state["image_proj"]:
                return int(self.state["image_proj"][key].shape[-1])
        return None


def parse_ip_adapter(tensors: Mapping[str, torch.Tensor], digest: str) -> IPAdapterWeights:
    """Split a flat safetensors state dict ("image_proj.*", "ip_adapter.*") as diffusers' load_ip_adapter
    does; ValueError for what is not an IP-Adapter."""
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in state:
            state[prefix][rest] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        raise ValueError("not an IP-Adapter checkpoint (needs image_proj.* and ip_adapter.* weights)")
    weights = IPAdapterWeights(digest, state)
    if weights.face is None and any("lora" in key for key in state["ip_adapter"]):
        raise ValueError(
            "attention LoRA weights (to_*_lora) belong to FaceID adapters, whose image_proj this lacks"
        )
    return weights


class IPAdapterFiles:
    """Parsed IP-Adapter checkpoints by content digest, least recently used leaving first."""

    def __init__(self, capacity: int = 4):
        self._cache: OrderedDict[str, IPAdapterWeights] = OrderedDict()
        self._capacity = capacity

    def get(self, blob: bytes) -> IPAdapterWeights:
        from safetensors.torch import load

        digest = hashlib.sha256(blob).hexdigest()
        weights = self._cache.get(digest)
        if weights is None:
            weights = self._cache[digest] = parse_ip_adapter(load(blob), digest)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(digest)
        return weights


# One per process (the Triton model instance): the same checkpoint sent again is parsed once.
FILES = IPAdapterFiles()


@dataclass(frozen=True)
class IPAdapterUnit:
    """One entry of fal's `ip_adapter` list, resolved."""

    weights: IPAdapterWeights
    images: tuple[np.ndarray, ...] = field(compare=False, repr=False)  # each (H, W, 3) uint8 RGB
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W) uint8
    scale: float = 1.0
    # fal's scale_json: diffusers' per-block scale config ({"down": {"block_2": [0.0, 1.0]}, "up": ...}),
    # kept as canonical JSON text so that it hashes; replaces `scale` when set.
    scale_json: str | None = None
    unconditional_noising_factor: float = 0.0  # fal's: 0 = diffusers' unconditional embeds (module docstring)
    face_pack: str | None = None  # FaceID: its InsightFace model pack directory (face_analysis)
    shortcut: bool = True  # FaceID Plus: fal's image_projection_shortcut (v1: False, v2: True)

    @property
    def instantid(self) -> bool:
        """InstantID's adapter on the face: a 512-wide Resampler with an InsightFace pack."""
        return self.weights.face_resampler and self.face_pack is not None

    @property
    def uses_encoder(self) -> bool:
        """Whether the CLIP image encoder runs for it (not for plain FaceID nor InstantID)."""
        return self.weights.uses_encoder and not self.instantid

    @property
    def scale_config(self) -> float | dict[str, Any]:
        return json.loads(self.scale_json) if self.scale_json is not None else self.scale


@dataclass(frozen=True)
class IPAdapterRequest:
    units: tuple[IPAdapterUnit, ...]
    image_encoder: str  # a local directory with the encoder's config.json and weights
    image_encoder_weight_name: str = DEFAULT_WEIGHT_NAME

    @property
    def key(self) -> Hashable:
        """What requests sharing one network batch must agree on (module docstring)."""
        return (
            self.image_encoder,
            self.image_encoder_weight_name,
            tuple(
                (u.weights.digest, u.scale, u.scale_json, len(u.images), u.mask is not None, u.shortcut)
                + ((True,) if u.instantid else ())  # face tokens (rows, n, 1, 512), not CLIP hidden states
                for u in self.units
            ),
        )


def _under_root(path: Path, root: Path, what: str) -> Path:
    resolved = path.expanduser().resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{what}: local paths must lie under {root.resolve()} (EMBER_LORA_MODEL_ROOT)")
    return resolved


def _is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~"))


def _adapter_file(path: str, subfolder: str | None, weight_name: str, root: Path, what: str) -> bytes:
    """The checkpoint bytes of a directory under `root` or an HF repo (+ subfolder, weight_name)."""
    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"{what}.weight_name must name a .safetensors file (pickles are refused)")
    if _is_local(path):
        file = _under_root(Path(path) / (subfolder or "") / weight_name, root, f"{what}.path")
        if not file.is_file():
            raise ValueError(f"{what}: no file {weight_name} in {path}/{subfolder or ''}")
        return file.read_bytes()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, weight_name, subfolder=subfolder or None)).read_bytes()
    except Exception as exc:
        raise ValueError(
            f"{what}: cannot fetch {path!r}/{weight_name} from the Hugging Face hub: {exc}"
        ) from exc


def _encoder_dir(path: str, subfolder: str | None, root: Path, what: str) -> str:
    """The image encoder's directory (config.json + weights): under `root`, or an HF repo's subfolder."""
    if _is_local(path):
        directory = _under_root(Path(path) / (subfolder or ""), root, what)
        if not (directory / "config.json").is_file():
            raise ValueError(f"{what}: {directory} is not an image encoder directory (no config.json)")
        return str(directory)
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(path, allow_patterns=[f"{prefix}config.json", f"{prefix}*.safetensors"])
    except Exception as exc:
        raise ValueError(f"{what}: cannot fetch {path!r} from the Hugging Face hub: {exc}") from exc
    return str(Path(snapshot) / prefix)


def _face_pack(source: Mapping[str, Any] | None, media: MediaReader, root: Path, what: str) -> str | None:
    """The InsightFace model pack directory of {"path": directory under root}, {"zip": a .zip under root}
    (a pack URL, streamed by the gateway to the checkpoint store) or {"media": i} (a .zip's bytes, from a
    direct Triton client); zips are unpacked once per content under root/PACK_CACHE."""
    if not source:
        return None
    if "path" in source:
        return str(_under_root(Path(source["path"]), root, what))
    pack = (
        media(source["media"], what).tobytes()
        if "media" in source
        else _under_root(Path(source["zip"]), root, what)
    )
    try:
        return str(unpack(pack, root / PACK_CACHE))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{what}: cannot unpack the model pack .zip: {exc}") from exc


def parse_ip_adapter_options(
    options: Mapping[str, Any] | None, media: MediaReader, root: Path
) -> IPAdapterRequest | None:
    """OPTIONS["ip_adapter"] (written by ember.endpoints.lora.ip_adapter) -> the request's IP-Adapters:

        {"adapters": [{"weights": {"media": i} | {"path": p, "subfolder": s, "weight_name": w},
                       "images": [i, ...], "mask": i | null, "scale": 1.0, "scale_json": {...} | null,
                       "insight_face": {"path": p} | {"media": i} | null, "shortcut": true}],
         "image_encoder": {"path": p | null, "subfolder": s | null, "weight_name": w}}

    Images are (H, W, 3) uint8 and masks (H, W) uint8 in MEDIA; a fetched checkpoint is its bytes as a
    (n,) uint8 array there. Without an image encoder path, the first adapter's repo/directory's
    `<subfolder>/image_encoder` is used, as diffusers' load_ip_adapter does (none when only plain FaceID
    adapters are given: they use no image encoder). FaceID adapters need "insight_face": an InsightFace
    model pack directory under `root`, or a .zip of one in MEDIA. ValueError names the field.
    """
    if not options or not options.get("adapters"):
        return None
    units = []
    for i, entry in enumerate(options["adapters"]):
        what = f"ip_adapter[{i}]"
        source = entry["weights"]
        if "media" in source:
            blob = media(source["media"], f"{what}.path").tobytes()
        else:
            blob = _adapter_file(
                source["path"], source.get("subfolder"), source.get("weight_name") or "", root, what
            )
        try:
            weights = FILES.get(blob)
        except ValueError as exc:
            raise ValueError(f"{what}.path: {exc}") from exc
        except Exception as exc:  # safetensors' own errors: not a safetensors file
            raise ValueError(f"{what}.path: not a usable safetensors file: {exc}") from exc
        images = tuple(media(j, f"{what}.ip_adapter_image_url") for j in entry["images"])
        if not images or any(im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8 for im in images):
            raise ValueError(f"{what}.ip_adapter_image_url: give at least one (H, W, 3) uint8 RGB image")
        mask = None if entry.get("mask") is None else media(entry["mask"], f"{what}.ip_adapter_mask_url")
        if mask is not None and (mask.ndim != 2 or mask.dtype != np.uint8):
            raise ValueError(f"{what}.ip_adapter_mask_url: the mask must be (H, W) uint8")
        scale_json = entry.get("scale_json")
        noising = float(entry.get("unconditional_noising_factor", 0.0))
        if not 0.0 <= noising <= 1.0:
            raise ValueError(f"{what}.unconditional_noising_factor must be from 0 to 1, not {noising}")
        pack = _face_pack(entry.get("insight_face"), media, root, f"{what}.insight_face_model_path")
        if weights.face_resampler and pack is None:  # no CLIP image encoder has 512-wide hidden states
            raise ValueError(
                f"{what}.insight_face_model_path is required for this adapter: its Resampler takes 512-d "
                "inputs, InstantID's ArcFace face embedding (e.g. the antelopev2 InsightFace model pack)"
            )
        if weights.face is not None and pack is None:
            raise ValueError(
                f"{what}.insight_face_model_path is required for this FaceID IP-Adapter: an InsightFace "
                "model pack (e.g. buffalo_l: det_10g.onnx + w600k_r50.onnx) to find and embed the face"
            )
        units.append(
            IPAdapterUnit(
                weights,
                images,
                mask,
                float(entry.get("scale", 1.0)),
                None if scale_json is None else json.dumps(scale_json, sort_keys=True),
                noising,
                pack if weights.face is not None or weights.face_resampler else None,
                bool(entry.get("shortcut", True)),
            )
        )
    encoder = options.get("image_encoder") or {}
    if not any(u.uses_encoder for u in units):
        directory = ""  # plain FaceID only: no CLIP image encoder runs
    elif encoder.get("path"):
        directory = _encoder_dir(encoder["path"], encoder.get("subfolder"), root, "image_encoder_path")
    else:
        first = options["adapters"][0]["weights"]
        if "path" not in first:
            raise ValueError(
                "image_encoder_path is required when ip_adapter[0].path is a URL (a weights file has no "
                "image_encoder folder beside it)"
            )
        sub = "/".join(p for p in (first.get("subfolder"), "image_encoder") if p)
        directory = _encoder_dir(
            first["path"], sub, root, "image_encoder_path (default: ip_adapter[0] image_encoder)"
        )
    return IPAdapterRequest(tuple(units), directory, encoder.get("weight_name") or DEFAULT_WEIGHT_NAME)


class IPAdapterUNet(nn.Module):
    """Inputs in spec order: sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, 77, D), then the
    `added` conditions (SDXL: text_embeds (B, P), time_ids (B, 6)), then `residuals` ControlNet residuals
    (ember.specs.controlnet.CONTROLLED_UNET's 13 on SD1.5, controlnet_xl.XL_CONTROLLED_UNET's 10 on SDXL;
    0 without ControlNets), then per adapter its image embeds (B, n, P) or (B, n, T, Dv) (FaceID: face
    embeddings (B, n, 512)), then per masked adapter its masks (B, n, H, W) in {0, 1}, then per FaceID Plus
    adapter its CLIP embeds (B, n, T, Dv), set as its projection's `clip_embeds` for the call with its
    `shortcut` (diffusers' FaceID Plus recipe sets both on the module)."""

    def __init__(
        self,
        unet: nn.Module,
        masked: tuple[bool, ...],
        residuals: int,
        added: tuple[str, ...] = (),
        shortcuts: tuple[bool | None, ...] = (),  # per adapter: FaceID Plus shortcut, None for the others
    ):
        super().__init__()
        self.unet = unet
        self.masked = masked
        self.residuals = residuals
        self.added = added
        self.shortcuts = shortcuts
        self.config = dict(unet.config)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *rest: torch.Tensor,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        conditions = dict(zip(self.added, rest[: len(self.added)], strict=True))
        rest = rest[len(self.added) :]
        if self.residuals:
            residuals, rest = rest[: self.residuals], rest[self.residuals :]
            kwargs["down_block_additional_residuals"] = residuals[:-1]
            kwargs["mid_block_additional_residual"] = residuals[-1]
        n = len(self.masked)
        given = iter(rest[n:])
        masks = [next(given) if m else None for m in self.masked]
        if any(self.masked):
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
        for i, shortcut in enumerate(self.shortcuts):
            if shortcut is not None:
                layer = self.unet.encoder_hid_proj.image_projection_layers[i]
                layer.clip_embeds, layer.shortcut = next(given), shortcut
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs={**conditions, "image_embeds": list(rest[:n])},
            return_dict=False,
            **kwargs,
        )[0]


def _unet_spec(request: IPAdapterRequest, base: Any) -> Any:
    """The base UNet's spec (SD1.5, SD1.5 with ControlNet residual inputs, or SDXL with its added
    conditions) plus the image-embed and mask inputs of this adapter set. Built per adapter set for the
    torch runtime; not exported."""
    extra = []
    for i, u in enumerate(request.units):
        images = f"images_{i}"
        if u.instantid:
            axes: tuple[str, ...] = ("batch", images, "face_token", "face_embedding")
        elif u.weights.face is not None:
            axes = ("batch", images, "face_embedding")
        elif u.weights.plain:
            axes = ("batch", images, "projection")
        else:
            axes = ("batch", images, "tokens", "vision_hidden")
        extra.append(TensorSpec(f"image_embeds_{i}", torch.float32, axes))
    for i, u in enumerate(request.units):
        if u.mask is not None:
            axes = ("batch", f"images_{i}", "image_height", "image_width")
            extra.append(TensorSpec(f"ip_mask_{i}", torch.float32, axes))
    for i, u in enumerate(request.units):
        if u.weights.face == "faceid_plus":
            axes = ("batch", f"images_{i}", "tokens", "vision_hidden")
            extra.append(TensorSpec(f"clip_embeds_{i}", torch.float32, axes))
    return dataclasses.replace(base, name="unet_ip_adapter", inputs=(*base.inputs, *extra))


def _check_widths(request: IPAdapterRequest, unet_config: Mapping[str, Any], family: str) -> None:
    """ValueError unless every adapter's IP attention layers take the base UNet's cross-attention width:
    an SD1.5 adapter (768) on an SDXL base (2048) or the reverse, said before diffusers fails to load it."""
    width = unet_config.get("cross_attention_dim")
    for i, unit in enumerate(request.units):
        trained = unit.weights.cross_attention_dim
        if isinstance(width, int) and trained not in (None, width):
            raise ValueError(
                f"ip_adapter[{i}] was made for a UNet with cross-attention width {trained}, but this {family} "
                f"base model's UNet has {width}: an SD1.5 IP-Adapter cannot run on an SDXL base or the reverse; "
                "pick the adapter made for the base (SDXL: e.g. h94/IP-Adapter with model_subfolder "
                "sdxl_models, weight_name ip-adapter_sdxl.safetensors)"
            )


@functools.cache
def _holder_class() -> type:
    from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin

    class Holder(IPAdapterMixin, StableDiffusionLoraLoaderMixin):
        """What diffusers' load_ip_adapter reads of a pipeline: `.unet`, and for a FaceID checkpoint's
        attention LoRA load_lora_weights / set_adapters (peft layers into `.unet` only; no text encoder)."""

        unet_name, text_encoder_name = "unet", "text_encoder"
        hf_device_map = None  # no accelerate device map: diffusers' offloading checks read these two

        def __init__(self, unet: nn.Module):
            self.unet, self.text_encoder = unet, None
            self.components = {"unet": unet}

    return Holder


class IPAdapterStage:
    """Image encoders and IP UNets, loaded on first use and kept (least recently used leaving)."""

    def __init__(self, settings: Settings, max_encoders: int = 2, max_unets: int = 2):
        self.device, self.dtype = settings.device, torch_dtype(settings.dtype)
        self.max_encoders, self.max_unets = max_encoders, max_unets
        self._encoders: OrderedDict[tuple[str, str], tuple[Runner, Any]] = OrderedDict()
        # Per base UNet runner (dropped with it when its base model is evicted): adapter digests -> the
        # IP-loaded UNet copy.
        self._unets: weakref.WeakKeyDictionary[Runner, OrderedDict[tuple[str, ...], nn.Module]] = (
            weakref.WeakKeyDictionary()
        )

    def encoder(self, request: IPAdapterRequest) -> tuple[Runner, Any]:
        """(the image encoder runner, its CLIPImageProcessor), sized as diffusers' load_ip_adapter sizes
        the feature extractor it creates: size = crop_size = the encoder's image_size."""
        from transformers import CLIPImageProcessor

        from ember.runtime.torch_runner import TorchRunner

        key = (request.image_encoder, request.image_encoder_weight_name)
        if key not in self._encoders:
            runner = TorchRunner(bind_image_encoder(key[1]), key[0], None, self.device, self.dtype)
            size = json.loads((Path(key[0]) / "config.json").read_text(encoding="utf-8"))["image_size"]
            self._encoders[key] = (runner, CLIPImageProcessor(size=size, crop_size=size))
            while len(self._encoders) > self.max_encoders:
                self._encoders.popitem(last=False)
        self._encoders.move_to_end(key)
        return self._encoders[key]

    def unet(self, base: Runner, request: IPAdapterRequest, controlled: bool) -> Runner:
        """The IP UNet for `request`'s adapters over the weights of `base` (the base model's UNet runner),
        taking ControlNet residuals too when `controlled`; its scales set for this batch."""
        from diffusers.loaders import IPAdapterMixin

        from ember.runtime.torch_runner import TorchRunner

        wrapper = getattr(base, "module", None)  # TorchRunner's spec wrapper (lora.BaseModel: torch)
        if not isinstance(base, TorchRunner) or wrapper is None:
            raise ValueError(
                "it needs the base model's UNet on the torch runtime (models.toml [lora.sdv1-5] runtime = "
                '"torch", or EMBER_RUNTIME=torch without that entry: the runtime of every fal-ai/lora base)'
            )
        original = wrapper.unet  # the diffusers UNet2DConditionModel inside the spec wrapper
        xl = original.config.get("addition_embed_type") == "text_time"
        _check_widths(request, original.config, "SDXL" if xl else "SD1.5")
        copies = self._unets.setdefault(base, OrderedDict())
        digests = tuple(u.weights.digest for u in request.units)
        unet = copies.get(digests)
        if unet is None:
            # Share every parameter and buffer (the memo maps them to themselves); copy the module objects,
            # their attention processors and config, which load_ip_adapter replaces / edits.
            shared = {id(t): t for t in itertools.chain(original.parameters(), original.buffers())}
            unet = copy.deepcopy(original, memo=shared)
            holder = _holder_class()(unet)
            states = [dict(u.weights.state) for u in request.units]
            try:
                holder.load_ip_adapter(
                    states, subfolder=[None] * len(states), weight_name=[None] * len(states)
                )
            except (KeyError, RuntimeError, ValueError) as exc:  # layers / widths of another base model
                raise ValueError(f"the IP-Adapter does not fit this base model's UNet: {exc}") from exc
            copies[digests] = unet
            while len(copies) > self.max_unets:
                copies.popitem(last=False)
        copies.move_to_end(digests)
        try:
            IPAdapterMixin.set_ip_adapter_scale(
                SimpleNamespace(unet=unet), [u.scale_config for u in request.units]
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"scale_json is not a valid per-block scale: {exc}") from exc
        masked = tuple(u.mask is not None for u in request.units)
        # The base spec's inputs in order: sample, timestep, encoder_hidden_states, on SDXL its "text_time"
        # conditions, then the ControlNet residuals when `controlled`
        spec = {
            (False, False): UNET,
            (False, True): CONTROLLED_UNET,
            (True, False): XL_UNET,
            (True, True): XL_CONTROLLED_UNET,
        }[xl, controlled]
        added = ("text_embeds", "time_ids") if xl else ()
        residuals = len(spec.inputs) - 3 - len(added)
        shortcuts = tuple(u.shortcut if u.weights.face == "faceid_plus" else None for u in request.units)
        module = IPAdapterUNet(unet, masked, residuals, added, shortcuts)
        dtype = next(unet.parameters()).dtype
        return TorchRunner(
            _unet_spec(request, spec), "", None, str(base.device), dtype, module=module, warmup=()
        )

    def denoiser(
        self, base: Runner, unet: Runner, controlled: Any, request: IPAdapterRequest | None
    ) -> Runner:
        """The UNet runner for a batch: `unet` (the base or ControlNet-residual one) when it has no
        IP-Adapter, else the IP UNet over `base`'s weights; ValueError("ip_adapter: ...") if it cannot run."""
        if request is None:
            return unet
        try:
            return self.unet(base, request, controlled is not None)
        except ValueError as exc:
            raise ValueError(f"ip_adapter: {exc}") from exc

    def attach(
        self, slots: Sequence[GuidedSlot], requests: Mapping[int, Any], width: int, height: int
    ) -> dict[int, str]:
        """Give each slot its request's IP-Adapter inputs (`unet_feeds`); returns the errors of the requests
        that cannot run, by slot index."""
        errors = {}
        for slot in slots:
            request = requests[slot.index]
            ip = request.ip_adapter
            if ip is None:
                continue
            k = slot.latents.shape[0]
            # the unconditional_noising_factor noise: its own generator, seeded with the request's seed
            noise = torch.Generator("cpu").manual_seed(request.seed)
            try:
                # beside the slot's own UNet inputs (SDXL: text_embeds, time_ids)
                slot.unet_feeds.update(self.feeds(ip, k, slot.rows > k, height, width, noise))
            except (
                OSError,
                ValueError,
                RuntimeError,
            ) as exc:  # unloadable encoder, embeds of the wrong width
                errors[slot.index] = f"ip_adapter: {exc}"
        return errors

    @torch.inference_mode()
    def feeds(
        self,
        request: IPAdapterRequest,
        k: int,
        do_cfg: bool,
        height: int,
        width: int,
        noise: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One request's extra UNet inputs, rows as its prompt rows ([uncond x k; cond x k] with CFG).
        `noise` draws the unconditional images of adapters with an unconditional_noising_factor."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        runner, processor = self.encoder(request) if request.image_encoder else (None, None)
        out: dict[str, torch.Tensor] = {}
        for i, unit in enumerate(request.units):
            face = unit.weights.face
            images = unit.images
            if face is not None or unit.instantid:
                embeds, images = self.faces(unit, i)  # (n, 512) face embeddings, the 224 aligned faces
                if unit.instantid:  # one token per face for the Resampler's attention: (n, 1, 512)
                    embeds = embeds[:, None]
                zeros = torch.zeros_like(embeds)  # diffusers' FaceID recipe (and InstantID's): zero uncond
                rows = [zeros[None]] * k + [embeds[None]] * k if do_cfg else [embeds[None]] * k
                out[f"image_embeds_{i}"] = torch.cat(rows)  # (rows, n, 512), InstantID (rows, n, 1, 512)
            if unit.uses_encoder:  # plain FaceID and InstantID run no CLIP image encoder
                if runner is None or processor is None:
                    raise ValueError(f"ip_adapter[{i}] needs a CLIP image encoder (image_encoder_path)")
                # (rows, n, P) plain, (rows, n, T, Dv) Plus / Full Face / FaceID Plus's clip_embeds
                name = f"clip_embeds_{i}" if face == "faceid_plus" else f"image_embeds_{i}"
                out[name] = self._clip_rows(runner, processor, request, unit, i, images, k, do_cfg, noise)
            if unit.mask is not None:
                # (1, 1, H, W) binarized at the output size, the same mask for each of the adapter's images
                mask = IPAdapterMaskProcessor().preprocess(
                    Image.fromarray(unit.mask), height=height, width=width
                )
                rows = 2 * k if do_cfg else k
                out[f"ip_mask_{i}"] = mask.expand(rows, len(unit.images), -1, -1).float()
        return out

    def faces(self, unit: IPAdapterUnit, i: int) -> tuple[torch.Tensor, tuple[np.ndarray, ...]]:
        """A FaceID adapter's images -> ((n, 512) ArcFace embeddings of each image's largest face, the faces
        aligned to 224x224 as insightface's norm_crop: FaceID Plus's CLIP encoder input)."""
        if unit.face_pack is None:
            raise ValueError(f"ip_adapter[{i}].insight_face_model_path is required for a FaceID IP-Adapter")
        pack = PACKS.get(unit.face_pack)
        embeds, crops = [], []
        for j, image in enumerate(unit.images):
            try:
                found = pack.largest(image)
            except NoFaceError as exc:
                at = f"[{j}]" if len(unit.images) > 1 else ""
                raise ValueError(f"ip_adapter[{i}].ip_adapter_image_url{at}: {exc}") from exc
            embeds.append(torch.from_numpy(pack.embed(image, found)))
            crops.append(norm_crop(image, found.kps, 224))
        return torch.stack(embeds), tuple(crops)

    def _clip_rows(
        self,
        runner: Runner,
        processor: Any,
        request: IPAdapterRequest,
        unit: IPAdapterUnit,
        i: int,
        images: Sequence[np.ndarray],
        k: int,
        do_cfg: bool,
        noise: torch.Generator | None,
    ) -> torch.Tensor:
        """The CLIP image encoder's rows for one adapter: (rows, n, P) image_embeds for plain adapters,
        (rows, n, T, Dv) penultimate hidden states for the others; unconditional as the module docstring."""
        pil = [Image.fromarray(image).convert("RGB") for image in images]
        pixels = processor(images=pil, return_tensors="pt").pixel_values  # (n, 3, S, S)
        encoded = runner.run({"pixel_values": pixels})
        features = encoded["image_embeds" if unit.weights.plain else "hidden_states"].shape[-1]
        if unit.weights.embed_width not in (None, features):
            raise ValueError(
                f"ip_adapter[{i}] takes image features of width {unit.weights.embed_width}, but the image "
                f"encoder {request.image_encoder} gives {features}: pick the encoder the adapter was trained "
                "with (image_encoder_path / image_encoder_subfolder)"
            )
        output = "image_embeds" if unit.weights.plain else "hidden_states"
        cond = encoded[output]  # (n, P) plain, (n, T, Dv) Plus / Full Face / FaceID Plus
        if unit.unconditional_noising_factor > 0:  # fal's noised unconditional image (module docstring)
            if noise is None:
                raise ValueError("unconditional_noising_factor needs the request's noise generator")
            blank = torch.rand(pixels.shape, generator=noise) * unit.unconditional_noising_factor
            uncond = runner.run({"pixel_values": blank})[output]
        elif unit.weights.plain:
            uncond = torch.zeros_like(cond)
        else:
            uncond = runner.run({"pixel_values": torch.zeros_like(pixels)})["hidden_states"]
        rows = [uncond[None]] * k + [cond[None]] * k if do_cfg else [cond[None]] * k
        return torch.cat(rows)  # (rows, n, ...)
