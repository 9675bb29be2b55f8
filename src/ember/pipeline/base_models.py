"""fal-ai/lora base models: what `model_name` names, made loadable, and its three networks' runners.

1. Single-file checkpoints (one .safetensors in the original CompVis/A1111 layout, as most fine-tunes are
   published). The gateway streams the URL into `<EMBER_LORA_MODEL_ROOT>/checkpoints/<sha256>.safetensors`
   (ember.gateway.checkpoints); here the family is told from the checkpoint's key names (read from the
   header, no tensor loaded), its diffusers config is picked by shapes from the local config directories
   (no hub: `ember/specs/single_file_configs/` plus any under `<root>/single-file-configs/`), and it is
   converted once with diffusers' `from_single_file` into a diffusers directory cached by content digest.
   SDXL single files (SGM layout: conditioner.embedders.0/1) are converted the same way, with
   StableDiffusionXLPipeline.from_single_file against `single_file_configs/sdxl` (or an operator config).
2. SDXL diffusers directories (a local one, an HF snapshot, or a converted single file) run as
   StableDiffusionXLPipeline (ember.pipeline.lora_xl, through the same `prepare` and `runners`); SD 2.x
   weights are refused naming model_name. A custom UNet (`unet_name`: a directory, HF snapshot or single
   file) must be of the base's family and text width (`check_custom_unet`).
3. Runners: torch loads the directory directly; onnxruntime (models.toml `[lora.sdv1-5] runtime`, the
   runtime of every fal-ai/lora base) exports the networks once through ember.specs.artifacts (SD1.5: text
   encoder, UNet, VAE decoder; SDXL: both text encoders too, artifact family ("lora", "sdxl")), keyed by the
   model's content (or HF snapshot), its variant and custom UNet, precision, opset and
   torch/onnx/onnxruntime versions. The request that triggers a conversion or export gets its progress as
   status log lines (`log`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ember.runtime import Runner, torch_dtype
from ember.settings import Settings
from ember.specs.checkpoint_keys import (
    SD1_TEXT,
    SDXL_OPEN_CLIP,
    SDXL_TEXT_0,
    UNET,
    VAE,
    checkpoint_family,
    refusal,
)

Log = Callable[[str], None]
LORA_FAMILY = ("lora", "sdv1-5")  # models.toml entry + artifact family of fal-ai/lora base models
LORA_XL_FAMILY = ("lora", "sdxl")  # artifact family of SDXL bases (their runtime is LORA_FAMILY's)
# Networks LoRAs change: exported refittable (ONNX Runtime overridable initializers); the VAE keeps constants.
REFITTABLE = ("text_encoder", "text_encoder_2", "unet")
BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "specs" / "single_file_configs"
CONFIGS_SUBDIR = "single-file-configs"  # operator-supplied config dirs under EMBER_LORA_MODEL_ROOT
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _nothing(message: str) -> None:
    return None


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors header (the data is not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - not a dict


def directory_family(source: str) -> str:
    """SD family ("sd15" or "sdxl") from a diffusers directory's own description (model_index.json, unet/config.json)."""
    root = Path(source)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{source} is not a diffusers model directory (no model_index.json)")
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
    sdxl = "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time"
    return "sdxl" if sdxl else "sd15"


def refuse_family(family: str, name: str) -> None:
    message = refusal(family, name)
    if message is not None:
        raise ValueError(message)


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    """How many distinct values the one group of `pattern` takes over the tensor names."""
    return len({m[1] for k in shapes if (m := re.match(pattern, k))})


def _signature_of_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The architecture sizes a config must agree with, read from the checkpoint's tensor shapes."""
    try:
        return _read_signature(checkpoint_family(shapes), shapes)
    except (KeyError, StopIteration):  # a tensor every such checkpoint has is missing
        raise ValueError(
            "the checkpoint lacks tensors of a complete Stable Diffusion model (UNet input/attention, VAE "
            "encoder, text encoder embeddings): send a full SD1.5 or SDXL base checkpoint"
        ) from None


def _read_signature(family: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    conv_in = shapes[f"{UNET}input_blocks.0.0.weight"]  # (C0, in_channels, 3, 3)
    cross = next(s for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    text_prefix = SDXL_TEXT_0 if family == "sdxl" else SD1_TEXT
    # (vocab, hidden); some old SD1.x files lack the `text_model.` level
    text = next(
        s for k, s in shapes.items() if k.startswith(text_prefix) and k.endswith("token_embedding.weight")
    )
    layers = _count(shapes, rf"{re.escape(text_prefix)}.*layers\.(\d+)\.")
    extra: dict[str, int] = {}
    if family == "sdxl":
        extra = {
            "text_2_hidden": shapes[f"{SDXL_OPEN_CLIP}token_embedding.weight"][1],
            "text_2_layers": _count(shapes, rf"{re.escape(SDXL_OPEN_CLIP)}transformer\.resblocks\.(\d+)\."),
            # every transformer block of the UNet (transformer_layers_per_block decides it)
            "unet_transformer_blocks": _count(shapes, rf"({re.escape(UNET)}.*transformer_blocks\.\d+)\."),
            "added_cond_dim": shapes[f"{UNET}label_emb.0.0.weight"][1],  # (time_embed, 6 * T + pooled)
        }
    return {
        "unet_channels": conv_in[0],
        "in_channels": conv_in[1],
        "cross_attention_dim": cross[1],
        "input_blocks": len({k.split(".")[3] for k in shapes if k.startswith(f"{UNET}input_blocks.")}),
        "vae_channels": shapes[f"{VAE}encoder.conv_in.weight"][0],
        "text_hidden": text[1],
        "text_layers": layers,
        **extra,
    }


def _signature_of_config(config_dir: Path) -> dict[str, int]:
    read = lambda sub, name="config.json": json.loads((config_dir / sub / name).read_text(encoding="utf-8"))
    unet, vae, text = read("unet"), read("vae"), read("text_encoder")
    extra: dict[str, int] = {}
    if (config_dir / "text_encoder_2").is_dir():
        text_2 = read("text_encoder_2")
        blocks = len(unet["down_block_types"])
        per_block = unet.get("transformer_layers_per_block", 1)
        per_block = per_block if isinstance(per_block, list) else [per_block] * blocks
        down = [i for i, t in enumerate(unet["down_block_types"]) if "CrossAttn" in t]
        up = [i for i, t in enumerate(unet["up_block_types"]) if "CrossAttn" in t]
        layers = unet["layers_per_block"]
        extra = {
            "text_2_hidden": text_2["hidden_size"],
            "text_2_layers": text_2["num_hidden_layers"],
            # down: layers_per_block attentions per block; up: one more; mid: the deepest block's depth
            "unet_transformer_blocks": sum(per_block[i] * layers for i in down)
            + sum(per_block[blocks - 1 - i] * (layers + 1) for i in up)
            + per_block[-1],
            "added_cond_dim": unet["projection_class_embeddings_input_dim"],
        }
    return {
        "unet_channels": unet["block_out_channels"][0],
        "in_channels": unet["in_channels"],
        "cross_attention_dim": unet["cross_attention_dim"],
        # conv_in, `layers_per_block` per block, a downsampler after each block but the last
        "input_blocks": 1 + len(unet["down_block_types"]) * (unet["layers_per_block"] + 1) - 1,
        "vae_channels": vae["block_out_channels"][0],
        "text_hidden": text["hidden_size"],
        "text_layers": text["num_hidden_layers"],
        **extra,
    }


def config_dirs(settings: Settings) -> list[Path]:
    """Diffusers config directories a single-file checkpoint may match, built-ins first."""
    found = [p for p in sorted(BUILTIN_CONFIGS.iterdir()) if (p / "model_index.json").is_file()]
    extra = settings.lora_models_dir / CONFIGS_SUBDIR
    if extra.is_dir():
        found += [p for p in sorted(extra.iterdir()) if (p / "model_index.json").is_file()]
    return found


def match_config(settings: Settings, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    want = _signature_of_checkpoint(shapes)
    for config_dir in config_dirs(settings):
        if _signature_of_config(config_dir) == want:
            return config_dir
    raise ValueError(
        f"the checkpoint's architecture {want} matches none of the known SD1.5 / SDXL configs; put its "
        f"diffusers config directory (model_index.json + component configs) under "
        f"{settings.lora_models_dir / CONFIGS_SUBDIR}"
    )


def _with_tokenizer(settings: Settings, config_dir: Path) -> Path:
    """A config directory with its tokenizers: built-in ones get CLIP's, written once from open_clip's BPE
    (SDXL: tokenizer_2 the same vocabulary padding with "!", as stable-diffusion-xl-base-1.0's)."""
    xl = (config_dir / "text_encoder_2").is_dir()
    if (config_dir / "tokenizer").is_dir() and (not xl or (config_dir / "tokenizer_2").is_dir()):
        return config_dir
    from ember.specs.clip_bpe import write_clip_tokenizer

    target = settings.export_dir / CONFIGS_SUBDIR / config_dir.name
    if not all((target / sub / "vocab.json").is_file() for sub in ("tokenizer", "tokenizer_2")[: 1 + xl]):
        staging = Path(tempfile.mkdtemp(prefix=f".{config_dir.name}-", dir=_mkdir(target.parent)))
        shutil.copytree(config_dir, staging / "config")
        if not (staging / "config" / "tokenizer").is_dir():
            write_clip_tokenizer(staging / "config" / "tokenizer")
        if xl and not (staging / "config" / "tokenizer_2").is_dir():
            write_clip_tokenizer(staging / "config" / "tokenizer_2", pad="!")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging / "config", target)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: Path) -> str:
    """sha256 of a checkpoint: the gateway names its cache files by it; others are hashed once here."""
    if _DIGEST.match(path.stem):
        return path.stem
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_single_file(settings: Settings, path: Path, log: Log = _nothing) -> Path:
    """The diffusers directory of SD1.5 / SDXL single-file checkpoint `path`, converted on first use and
    cached under <export_dir>/lora-single-file/<sha256>/. ValueError when it is not a servable checkpoint."""
    from ember.specs.artifacts import _exclusive

    shapes = checkpoint_shapes(path)
    family = checkpoint_family(shapes)
    refuse_family(family, "the checkpoint")
    digest = file_digest(path)
    target = settings.export_dir / "lora-single-file" / digest
    if (target / "model_index.json").is_file():
        return target
    config_dir = match_config(settings, shapes)
    with _exclusive(settings.export_dir / "lora-single-file.lock"):
        if (target / "model_index.json").is_file():  # another process converted it meanwhile
            return target
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        log(f"converting single-file checkpoint {digest[:12]} ({config_dir.name} layout) to diffusers format")
        config = str(_with_tokenizer(settings, config_dir))
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=config, local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=config,
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=_mkdir(target.parent)))
        try:
            pipe.save_pretrained(staging / "model", safe_serialization=True)
            os.replace(staging / "model", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_single_file_unet(settings: Settings, path: Path, config_dir: Path, log: Log = _nothing) -> Path:
    """The diffusers directory of a UNet-only single file (`unet_name` as a URL: LDM names under
    `model.diffusion_model.` / `diffusion_model.`, or diffusers' own names), converted with diffusers'
    UNet2DConditionModel.from_single_file against the base model's own UNet config (`config_dir`: the UNet
    replaces that one, so it must share its architecture) and cached under
    <export_dir>/lora-single-file-unet/<file sha256>-<config sha256[:16]>/. ValueError when it does not fit."""
    from ember.specs.artifacts import _exclusive
    from ember.specs.checkpoint_keys import LDM_UNET_PREFIXES, unet_file_family, unet_file_layout

    shapes = checkpoint_shapes(path)
    try:
        layout = unet_file_layout(shapes)
    except ValueError as exc:
        raise ValueError(f"unet_name: {exc}") from None
    config = (config_dir / "config.json").read_bytes()
    base_family = "sdxl" if json.loads(config).get("addition_embed_type") == "text_time" else "sd15"
    _refuse_unet_family(unet_file_family(shapes), base_family, "this UNet file")
    key = f"{file_digest(path)}-{hashlib.sha256(config).hexdigest()[:16]}"
    target = settings.export_dir / "lora-single-file-unet" / key
    if (target / "config.json").is_file():
        return target
    with _exclusive(settings.export_dir / "lora-single-file-unet.lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        log(f"converting single-file UNet {path.stem[:12]} ({layout} key names) to diffusers format")
        tensors = load_file(str(path))
        if layout == "ldm":  # from_single_file's converter reads "model.diffusion_model.<ldm name>"
            tensors = {
                (k if k.startswith(LDM_UNET_PREFIXES[0]) else "model." + k): v
                for k, v in tensors.items()
                if k.startswith(LDM_UNET_PREFIXES)
            }
        try:
            unet = UNet2DConditionModel.from_single_file(
                tensors, config=str(config_dir), local_files_only=True
            )
        except (KeyError, IndexError, ValueError, RuntimeError) as exc:  # a key or shape the base UNet lacks
            raise ValueError(
                f"unet_name: this UNet file does not fit the base model's UNet architecture: {exc}"
            ) from None
        unloaded = [name for name, p in unet.named_parameters() if p.device.type == "meta"]
        if unloaded:
            raise ValueError(
                f"unet_name: the UNet file lacks {len(unloaded)} of the base UNet's weights "
                f"(e.g. {unloaded[:2]}); send a complete UNet of the base model's architecture"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{path.stem[:12]}-", dir=_mkdir(target.parent)))
        try:
            unet.save_pretrained(staging / "unet", safe_serialization=True)
            os.replace(staging / "unet", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def single_file_family(source: str) -> str | None:
    """The family of a single-file checkpoint `source` from its header ("sd15", "sdxl", ...); None for a
    directory. Picks the base-model class before anything is converted (ember.pipeline.lora)."""
    path = Path(source)
    if not path.is_file():
        return None
    try:
        return checkpoint_family(checkpoint_shapes(path))
    except ValueError:
        return None  # prepare() raises the full message


def prepare(settings: Settings, ref: Any, log: Log = _nothing) -> Any:
    """`ref` (a ModelRef) with single-file checkpoints (model_name, unet_name) converted to directories;
    SD2 refused; a custom UNet of another family than the base refused naming unet_name."""
    import dataclasses

    source = Path(ref.source)
    if source.is_file():
        ref = dataclasses.replace(ref, source=str(convert_single_file(settings, source, log)))
    else:
        refuse_family(directory_family(ref.source), f"model_name {ref.source!r}")
    if ref.unet and Path(ref.unet).is_file():
        unet = convert_single_file_unet(settings, Path(ref.unet), Path(ref.source) / "unet", log)
        ref = dataclasses.replace(ref, unet=str(unet))
    if ref.unet:
        check_custom_unet(ref.source, ref.unet)
    return ref


def _refuse_unet_family(unet_family: str, base_family: str, what: str) -> None:
    if unet_family != base_family:
        names = {"sd15": "SD1.5", "sdxl": "SDXL"}
        raise ValueError(
            f"unet_name: {what} is an {names[unet_family]} UNet, the base model (model_name) is "
            f"{names[base_family]}: send a UNet of the base model's family"
        )


# What the base's other networks fix about a UNet replacing its own: the latent channels (initial noise, VAE),
# the text width (its encoders) and SDXL's added-condition width (pooled embedding + time ids). Also the
# dims its ONNX export is traced and verified at (read from the base's unet/config.json).
_UNET_INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "projection_class_embeddings_input_dim")


def check_custom_unet(source: str, unet: str) -> None:
    """ValueError naming unet_name unless the UNet directory `unet` can replace the UNet of the diffusers
    directory `source`: the same family (an SDXL UNet has the "text_time" added conditions) and the same
    _UNET_INTERFACE sizes."""
    if not (Path(source) / "unet" / "config.json").is_file():
        return  # an incomplete base directory: its loader says what it lacks
    read = lambda path: json.loads((path / "config.json").read_text(encoding="utf-8"))
    custom, base = read(Path(unet)), read(Path(source) / "unet")
    family = lambda config: "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    _refuse_unet_family(family(custom), family(base), f"{unet}")
    differ = {k: (custom.get(k), base.get(k)) for k in _UNET_INTERFACE if custom.get(k) != base.get(k)}
    if differ:
        raise ValueError(
            f"unet_name: {unet} does not fit the base model's other networks ((UNet, base) sizes: "
            f"{differ}): a UNet of another model size or kind (e.g. an inpainting UNet)"
        )


class LazyWeights(Mapping[str, torch.Tensor]):
    """A runner's weights, asked for on first use: a runtime without weight access (no refit) fails only
    for requests that bring LoRAs, with its own RefitNotSupportedError message."""

    def __init__(self, runner: Runner):
        self._runner = runner
        self._weights: Mapping[str, torch.Tensor] | None = None

    def _get(self) -> Mapping[str, torch.Tensor]:
        if self._weights is None:
            self._weights = self._runner.weights()
        return self._weights

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def lora_runtime(settings: Settings) -> str:
    """models.toml `[lora.sdv1-5] runtime`, else EMBER_RUNTIME (torch when the entry is missing): the
    runtime of every fal-ai/lora base model, SD1.5 and SDXL alike."""
    if LORA_FAMILY[0] not in settings.models:
        return "torch"
    return settings.model_runtime(*LORA_FAMILY)


def export_key(settings: Settings, ref: Any, family: tuple[str, str] = LORA_FAMILY) -> dict[str, Any]:
    """Everything a base model's ONNX export depends on; a change gives a new artifact directory.
    `family`: the artifact family of its networks (LORA_FAMILY, or LORA_XL_FAMILY for SDXL bases)."""
    from ember.specs.artifacts import (
        OPSET,
        PRECISION,
        REFIT_MAP_VERSION,
        _installed,
        _source_fingerprint,
        family_spec,
    )

    source = Path(ref.source)
    # An HF snapshot directory is named by its commit: that is the revision.
    revision = source.name if source.parent.name == "snapshots" else None
    return {
        "family": family[0],
        "variant": family[1],
        "source": ref.source,
        "revision": None,  # the source is already a resolved directory (from_pretrained takes no revision)
        "hf_commit": revision,
        "source_fingerprint": _source_fingerprint(ref.source),
        "weights_variant": ref.variant,
        "unet": ref.unet,
        "unet_fingerprint": _source_fingerprint(ref.unet) if ref.unet else None,
        "precision": PRECISION,
        "opset": OPSET,
        "torch": _installed("torch"),
        "onnx": _installed("onnx"),
        "onnxruntime": _installed("onnxruntime"),
        "specs": dict(family_spec(*family).spec_versions),
        "refit_map": REFIT_MAP_VERSION,
    }


def onnx_artifacts(
    settings: Settings,
    ref: Any,
    networks: tuple[Any, ...],
    log: Log = _nothing,
    family: tuple[str, str] = LORA_FAMILY,
) -> Any:
    """The artifact directory of `ref`'s ONNX exports, exporting (and verifying) what is missing first."""
    from ember.specs.artifacts import _build, _complete, _exclusive, _key_hash, family_spec, read_artifacts

    key = export_key(settings, ref, family)
    path = settings.export_dir / f"{family[0]}-{family[1]}" / _key_hash(key)
    names = [net.name for net in networks]
    if not _complete(path, True, names):
        with _exclusive(settings.export_dir / f"{family[0]}-{family[1]}.lock"):
            if not _complete(path, True, names):
                log(f"exporting {', '.join(names)} to ONNX (first use of this base model; cached after)")
                _build(path, key, family_spec(*family), True, False, networks=networks, log=log)
    else:
        log(f"ONNX exports of this base model found in the cache ({path.name})")
    return read_artifacts(path)


def runners(
    settings: Settings,
    ref: Any,
    log: Log = _nothing,
    networks: tuple[Any, ...] | None = None,
    family: tuple[str, str] = LORA_FAMILY,
) -> tuple[Runner, ...]:
    """The runners of a prepared `ref`'s `networks` (specs bound to its variant and custom UNet; default
    SD1.5's text encoder, UNet, VAE decoder), in that order, on the lora model's runtime. A spec's
    engine_dtype (SDXL's force_upcast VAE: float32) overrides EMBER_DTYPE on torch; ONNX exports are fp32."""
    if networks is None:
        from ember.specs.lora import bind_loaders

        networks = bind_loaders(ref.variant, ref.unet)
    runtime = lora_runtime(settings)
    if runtime == "torch":
        from ember.runtime.torch_runner import TorchRunner

        dtype = torch_dtype(settings.dtype)
        return tuple(
            TorchRunner(n, ref.source, None, settings.device, n.engine_dtype or dtype) for n in networks
        )
    if runtime == "onnxruntime":
        from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner, provider_list

        artifacts = onnx_artifacts(settings, ref, networks, log, family)
        # What create_runner builds for onnxruntime; the runtime was decided above by lora_runtime (SDXL's
        # artifact family has no models.toml entry of its own to look it up). LoRAs refit the text
        # encoders and UNet (overridable initializers); the VAE keeps constant weights.
        providers = provider_list(settings)
        return tuple(
            OnnxRuntimeRunner(
                n, artifacts.onnx_path(n.name), providers=providers, refittable=n.name in REFITTABLE
            )
            for n in networks
        )
    raise ValueError(
        f"fal-ai/lora base models run on torch or onnxruntime, not {runtime!r} (models.toml [lora.sdv1-5])"
    )
