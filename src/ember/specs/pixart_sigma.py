"""The networks of PixArt-Σ: T5 encoder (with its attention mask), the PixArt DiT, and the VAE decoder.

The VAE decoder is the same network as SD1.5's (an AutoencoderKL in `vae/`; PixArt-Σ ships SDXL's VAE), so
its spec is reused from sd15.py. Each wrapper's forward takes the spec's inputs by name and returns its output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn
from transformers import T5EncoderModel

from ember.specs.base import NetworkSpec, TensorSpec, randn_sample
from ember.specs.sd15 import LATENT_SCALE, VAE_DECODER

# PixArt-Σ's T5 context: prompts are padded / truncated to 300 tokens (diffusers' max_sequence_length).
TEXT_LENGTH = 300
# The DiT patchifies 2x2 latent pixels: latent sides must be even, so image sides multiples of 16.
PATCH_PIXELS = LATENT_SCALE * 2
# Trace and verify at shapes whose latents are even (the patch grid needs it) and differ from each other and
# from the model's sample_size, so a size baked into the graph (e.g. the positional embedding) fails.
TRACE_SHAPE = (2, 272, 208)  # (batch, height, width) px -> 34 x 26 latents
VERIFY_SHAPE = (1, 192, 320)


class T5TextEncoder(nn.Module):
    """input_ids (B, 300) int64 + attention_mask (B, 300) int64 -> last hidden state (B, 300, D).

    The mask matters: diffusers' PixArtSigmaPipeline passes it, so padding tokens are not attended to.
    """

    def __init__(self, text_encoder: T5EncoderModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[0]


class PixArtDiT(nn.Module):
    """One PixArt-Σ transformer call.

    timestep is float (B,) so one batch may mix steps and schedulers (the model's sinusoidal embedding
    casts it to float anyway). encoder_attention_mask (B, 300) is the T5 mask: the model turns it into an
    additive bias. Σ has no resolution / aspect-ratio conditions (use_additional_conditions=False). The
    learned-sigma half of the output (out_channels = 2 x in_channels) is dropped here: guidance and the
    scheduler use only the noise half, and guidance is per channel, so dropping it first changes nothing.
    """

    def __init__(self, transformer: PixArtTransformer2DModel):
        super().__init__()
        self.transformer = transformer
        self.config = dict(transformer.config)
        self.latent_channels = int(transformer.config.in_channels)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w), h and w even
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 300, D_t5)
        encoder_attention_mask: torch.Tensor,  # (B, 300), 1 = token, 0 = padding
    ) -> torch.Tensor:
        out = self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]  # (B, out_channels, h, w)
        return out[:, : self.latent_channels]


def _load_text_encoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    model = T5EncoderModel.from_pretrained(source, subfolder="text_encoder", revision=revision, dtype=dtype)
    return T5TextEncoder(model.eval())


def _load_transformer(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    transformer = PixArtTransformer2DModel.from_pretrained(
        source, subfolder="transformer", revision=revision, dtype=dtype
    )
    if transformer.use_additional_conditions:
        raise ValueError(
            f"{source}: the transformer uses resolution/aspect-ratio conditions (PixArt-α); "
            "the pixart_sigma endpoint serves PixArt-Σ, which has none (use_additional_conditions=false)"
        )
    return PixArtDiT(transformer.eval())


def _image_dims(batch: int, height: int, width: int) -> dict[str, int]:
    return {
        "batch": batch,
        "latent_height": height // LATENT_SCALE,
        "latent_width": width // LATENT_SCALE,
        "image_height": height,
        "image_width": width,
    }


def _sample(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if spec.name == "input_ids":
        # ids 3..99 are ordinary pieces in every T5 vocabulary (0-2 are <pad>, </s>, <unk>)
        return torch.randint(3, 100, shape, generator=generator, dtype=spec.dtype)
    if spec.name in ("attention_mask", "encoder_attention_mask"):
        # A realistic mask: each row keeps a random-length prefix of real tokens, the rest is padding.
        lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=generator)
        return (torch.arange(shape[1])[None, :] < lengths).to(spec.dtype)
    if spec.name == "timestep":
        return torch.randint(0, 1000, shape, generator=generator).to(spec.dtype)
    return randn_sample(spec, shape, generator)


def _text_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {"sequence": TEXT_LENGTH, "hidden": config["d_model"]}


def _transformer_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        "latent_channels": config["in_channels"],
        "sequence": TEXT_LENGTH,
        "hidden": config["caption_channels"],
    }


F32, I64 = torch.float32, torch.int64

T5_TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    subfolder="text_encoder",
    version=1,
    inputs=(
        TensorSpec("input_ids", I64, ("batch", "sequence")),
        TensorSpec("attention_mask", I64, ("batch", "sequence")),
    ),
    outputs=(TensorSpec("text_embeddings", F32, ("batch", "sequence", "hidden")),),
    load=_load_text_encoder,
    static_dims=_text_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_shape=TRACE_SHAPE,
    verify_shape=VERIFY_SHAPE,
)

PIXART_TRANSFORMER = NetworkSpec(
    name="transformer",
    subfolder="transformer",
    version=1,
    inputs=(
        TensorSpec("sample", F32, ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", F32, ("batch",)),
        TensorSpec("encoder_hidden_states", F32, ("batch", "sequence", "hidden")),
        TensorSpec("encoder_attention_mask", I64, ("batch", "sequence")),
    ),
    outputs=(TensorSpec("noise_pred", F32, ("batch", "latent_channels", "latent_height", "latent_width")),),
    load=_load_transformer,
    static_dims=_transformer_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_shape=TRACE_SHAPE,
    verify_shape=VERIFY_SHAPE,
)

PIXART_SIGMA_NETWORKS = (T5_TEXT_ENCODER, PIXART_TRANSFORMER, VAE_DECODER)
