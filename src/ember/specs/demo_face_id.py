"""Tiny random-weight IP-Adapter FaceID files and a tiny InsightFace model pack, for fal-ai/lora tests and
the offline demo.

FaceID adapters, laid out as h94/IP-Adapter-FaceID (whose files are .bin pickles: here the same state dicts
saved as .safetensors, flat "image_proj.*" / "ip_adapter.*" keys under the original names, which diffusers'
load_ip_adapter converts):

    <dir>/ip-adapter-faceid_sd15.safetensors        FaceID: MLPProjModel (proj.0 / proj.2 / norm: the
                                                    512-d face embedding -> 4 tokens of the UNet's
                                                    cross-attention width)
    <dir>/ip-adapter-faceid-plusv2_sd15.safetensors FaceID Plus (v1 and v2 share the layout; v2 is run with
                                                    shortcut=True): ProjPlusModel (the MLP + norm, then
                                                    perceiver_resampler over the CLIP hidden states of the
                                                    aligned face; original key names layers.i.0.to_kv, ...)
    <dir>/image_encoder/                            the tiny ViT-H CLIP vision encoder (ember.specs.
                                                    demo_ip_adapter's)

Both carry, as the originals do, the LoRAIPAttnProcessor weights in "ip_adapter.*": per attention processor
id (attn_processors order: even = attn1, odd = attn2) to_q/k/v/out_lora.down/up, and for attn2 to_k_ip /
to_v_ip.

InsightFace pack (`build_tiny_insightface`), named as buffalo_l's files:

    <dir>/det_10g.onnx     a SCRFD-signature detector: input "input.1" (1, 3, H, W); 9 outputs, scores (N, 1)
                           x 3 strides, then distances (N, 4) x 3, then keypoint offsets (N, 10) x 3, N =
                           (H / s) * (W / s) * 2 anchors. Each stride's head is one conv of kernel = stride =
                           s (a cell's mean colour): anchor a's score = sigmoid(ALPHA * (mean of R and B
                           - THRESHOLDS[a])), so only stride-32 cells fully covered by a red+blue-saturated
                           block fire (strides 8 and 16 never do); its box distances are DISTANCE +
                           SIZE_GAIN * mean G (a green block is a bigger face), keypoint offsets KPS (stride
                           units).
    <dir>/w600k_r50.onnx   an ArcFace-signature recognizer: input "input.1" (1, 3, 112, 112) -> (1, 512),
                           random conv + linear.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ember.specs.demo_ip_adapter import STD, _hidden_size, _image_encoder

FACEID_WEIGHT_NAME = "ip-adapter-faceid_sd15.safetensors"
FACEID_PLUS_WEIGHT_NAME = "ip-adapter-faceid-plusv2_sd15.safetensors"
ID_DIM = 512  # ArcFace embedding width (the real one too)
TOKENS = 4  # FaceID: 4 face tokens (the real ones too)
LORA_RANK = 4  # real: 128
RESAMPLER_HEADS = 1  # diffusers reads heads = to_q rows // 64 (dim_head 64); real: cross // 64 = 12

STRIDES = (8, 16, 32)
ALPHA = 40.0  # score logit gain
THRESHOLDS = (0.9, 0.92)  # per anchor: a fully saturated cell (mean 0.996) scores ~0.98 and ~0.96
DISTANCE = (2.0, 2.0, 2.0, 2.0)  # left, top, right, bottom in stride units, at mean G = 0
SIZE_GAIN = 1.0  # + this x the cell's mean normalised G
KPS = (-1.0, -0.5, 1.0, -0.5, 0.0, 0.3, -0.8, 1.2, 0.8, 1.2)  # eyes, nose, mouth corners (x, y) / stride


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * STD


def _lora_attention(unet_config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LoRAIPAttnProcessor weights per attention processor, keyed by its index in attn_processors."""
    from diffusers import UNet2DConditionModel

    cross = unet_config["cross_attention_dim"]
    with torch.device("meta"):
        names = list(UNet2DConditionModel.from_config(unet_config).attn_processors)
    state = {}
    for key_id, name in enumerate(names):
        hidden = _hidden_size(unet_config, name)
        context = hidden if name.endswith("attn1.processor") else cross
        for kind, width_in in (("to_q", hidden), ("to_k", context), ("to_v", context), ("to_out", hidden)):
            state[f"ip_adapter.{key_id}.{kind}_lora.down.weight"] = _rand(generator, LORA_RANK, width_in)
            state[f"ip_adapter.{key_id}.{kind}_lora.up.weight"] = _rand(generator, hidden, LORA_RANK)
        if name.endswith("attn2.processor"):
            state[f"ip_adapter.{key_id}.to_k_ip.weight"] = _rand(generator, hidden, cross)
            state[f"ip_adapter.{key_id}.to_v_ip.weight"] = _rand(generator, hidden, cross)
    return state


def _mlp(cross: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """MLPProjModel's proj (Linear 512 -> 1024, GELU, Linear 1024 -> cross x 4) and norm (LayerNorm)."""
    return {
        "image_proj.proj.0.weight": _rand(generator, 2 * ID_DIM, ID_DIM) * 4,  # unit-norm input: larger gain
        "image_proj.proj.0.bias": _rand(generator, 2 * ID_DIM),
        "image_proj.proj.2.weight": _rand(generator, cross * TOKENS, 2 * ID_DIM),
        "image_proj.proj.2.bias": _rand(generator, cross * TOKENS),
        "image_proj.norm.weight": 1 + _rand(generator, cross),
        "image_proj.norm.bias": _rand(generator, cross),
    }


def faceid_state_dict(unet_config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = _mlp(unet_config["cross_attention_dim"], generator)
    state.update(_lora_attention(unet_config, generator))
    return state


def faceid_plus_state_dict(
    unet_config: dict, vision_hidden: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """ProjPlusModel: the MLP + norm, then FacePerceiverResampler (dim = cross, depth 4, ff_mult 4) over
    the CLIP hidden states (T, vision_hidden)."""
    cross = unet_config["cross_attention_dim"]
    inner = 64 * RESAMPLER_HEADS
    state = _mlp(cross, generator)
    resampler = "image_proj.perceiver_resampler"
    state.update(
        {
            f"{resampler}.proj_in.weight": _rand(generator, cross, vision_hidden),
            f"{resampler}.proj_in.bias": _rand(generator, cross),
            f"{resampler}.proj_out.weight": _rand(generator, cross, cross),
            f"{resampler}.proj_out.bias": _rand(generator, cross),
            f"{resampler}.norm_out.weight": 1 + _rand(generator, cross),
            f"{resampler}.norm_out.bias": _rand(generator, cross),
        }
    )
    for i in range(4):
        layer = f"{resampler}.layers.{i}"
        for norm in (f"{layer}.0.norm1", f"{layer}.0.norm2", f"{layer}.1.0"):
            state[f"{norm}.weight"], state[f"{norm}.bias"] = (
                1 + _rand(generator, cross),
                _rand(generator, cross),
            )
        state[f"{layer}.0.to_q.weight"] = _rand(generator, inner, cross)
        state[f"{layer}.0.to_kv.weight"] = _rand(generator, 2 * inner, cross)
        state[f"{layer}.0.to_out.weight"] = _rand(generator, cross, inner)
        state[f"{layer}.1.1.weight"] = _rand(generator, 4 * cross, cross)
        state[f"{layer}.1.3.weight"] = _rand(generator, cross, 4 * cross)
    state.update(_lora_attention(unet_config, generator))
    return state


def build_tiny_faceid(directory: Path, base_model: Path, seed: int = 0) -> Path:
    """Write both tiny FaceID adapters and the image encoder for the SD1.5 model at `base_model`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet_config = json.loads((Path(base_model) / "unet" / "config.json").read_text(encoding="utf-8"))
    generator = torch.Generator().manual_seed(seed)
    save_file(faceid_state_dict(unet_config, generator), directory / FACEID_WEIGHT_NAME)
    torch.manual_seed(seed)
    encoder = _image_encoder()
    encoder.save_pretrained(directory / "image_encoder", safe_serialization=True)
    plus = faceid_plus_state_dict(unet_config, encoder.config.hidden_size, generator)
    save_file(plus, directory / FACEID_PLUS_WEIGHT_NAME)
    return directory


class TinySCRFD(nn.Module):
    """SCRFD's I/O signature with hand-set weights (module docstring)."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(3, 2 * 15, s, stride=s) for s in STRIDES)
        with torch.no_grad():
            for stride, conv in zip(STRIDES, self.heads, strict=True):
                conv.weight.zero_()
                conv.bias.zero_()
                mean = 1.0 / (stride * stride)  # a kernel summing the cell, scaled: the cell's mean
                for a, threshold in enumerate(THRESHOLDS):
                    if stride == 32:
                        conv.weight[a, 0] = ALPHA * mean / 2  # (mean R + mean B) / 2
                        conv.weight[a, 2] = ALPHA * mean / 2
                        conv.bias[a] = -ALPHA * threshold
                    else:
                        conv.bias[a] = -30.0  # never fires
                    for j in range(4):
                        conv.weight[2 + 4 * a + j, 1] = SIZE_GAIN * mean  # + mean G
                        conv.bias[2 + 4 * a + j] = DISTANCE[j]
                    for j in range(10):
                        conv.bias[10 + 10 * a + j] = KPS[j]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, boxes, kpss = [], [], []
        for conv in self.heads:
            y = conv(x).permute(0, 2, 3, 1)  # (1, h, w, 30): anchors fastest after the cell, as SCRFD
            scores.append(torch.sigmoid(y[..., 0:2]).reshape(-1, 1))
            boxes.append(y[..., 2:10].reshape(-1, 4))
            kpss.append(y[..., 10:30].reshape(-1, 10))
        return (*scores, *boxes, *kpss)


class TinyArcFace(nn.Module):
    """ArcFace's I/O signature: (1, 3, 112, 112) -> (1, 512), random weights."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)  # -> (1, 8, 14, 14)
        self.fc = nn.Linear(8 * 14 * 14, ID_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build_tiny_insightface(directory: Path, seed: int = 0) -> Path:
    """Write the tiny InsightFace pack (det_10g.onnx, w600k_r50.onnx) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    outputs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TinySCRFD().eval(),
            (torch.zeros(1, 3, 640, 640),),
            str(directory / "det_10g.onnx"),
            input_names=["input.1"],
            output_names=outputs,
            dynamic_axes={"input.1": {2: "height", 3: "width"}, **{o: {0: "anchors"} for o in outputs}},
            opset_version=17,
            dynamo=False,
        )
        torch.onnx.export(
            TinyArcFace(seed).eval(),
            (torch.zeros(1, 3, 112, 112),),
            str(directory / "w600k_r50.onnx"),
            input_names=["input.1"],
            output_names=["embedding"],  # (the real one names it "683")
            opset_version=17,
            dynamo=False,
        )
    return directory


def face_image(
    height: int, width: int, blocks: list[tuple[int, int, int, tuple[int, int, int]]]
) -> np.ndarray:
    """A black (H, W, 3) uint8 image with square `blocks` (top, left, side, RGB colour): the tiny
    detector's faces."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for top, left, side, colour in blocks:
        image[top : top + side, left : left + side] = colour
    return image
