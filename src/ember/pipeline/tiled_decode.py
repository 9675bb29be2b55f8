"""Tiled VAE decode (fal-ai/lora's tile_width/height and tile_stride_width/height): the latent is cut
into overlapping tiles, each decoded alone through the VAE decoder runner, and neighbours are blended
linearly over their overlap, as diffusers' AutoencoderKL.tiled_decode does (there with square tiles,
stride = tile * (1 - tile_overlap_factor)); here width and height may differ."""

from __future__ import annotations

import torch

from ember.runtime import Runner


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b's first `extent` rows/columns along `dim` (2: vertical, 3: horizontal) ramp in from a's last ones."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for k in range(extent):
        w = k / extent
        if dim == 2:
            b[:, :, k, :] = a[:, :, -extent + k, :] * (1 - w) + b[:, :, k, :] * w
        else:
            b[:, :, :, k] = a[:, :, :, -extent + k] * (1 - w) + b[:, :, :, k] * w
    return b


@torch.inference_mode()  # runner outputs are inference tensors; blending updates them in place
def tiled_decode(
    vae_decoder: Runner,
    latents: torch.Tensor,  # (N, 4, h, w), already divided by the VAE scaling factor
    tile: tuple[int, int],  # (height, width) of a tile in pixels
    stride: tuple[int, int],  # (height, width) step between tiles in pixels, <= tile
    scale: int = 8,  # pixels per latent
) -> torch.Tensor:
    """(N, 3, 8h, 8w). A latent that fits in one tile is decoded whole (diffusers' rule)."""
    (tile_h, tile_w), (stride_h, stride_w) = tile, stride
    lat_tile_h, lat_tile_w = tile_h // scale, tile_w // scale
    if latents.shape[2] <= lat_tile_h and latents.shape[3] <= lat_tile_w:
        return vae_decoder.run({"latent": latents})["images"]
    lat_stride_h, lat_stride_w = max(1, stride_h // scale), max(1, stride_w // scale)
    # Overlap in pixels that is blended, and how much of each tile is kept.
    blend_h, blend_w = tile_h - lat_stride_h * scale, tile_w - lat_stride_w * scale
    keep_h, keep_w = tile_h - blend_h, tile_w - blend_w
    rows = []
    for i in range(0, latents.shape[2], lat_stride_h):
        rows.append(
            [
                vae_decoder.run({"latent": latents[:, :, i : i + lat_tile_h, j : j + lat_tile_w]})["images"]
                for j in range(0, latents.shape[3], lat_stride_w)
            ]
        )
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, decoded in enumerate(row):
            if i > 0:
                decoded = _blend(rows[i - 1][j], decoded, blend_h, 2)
            if j > 0:
                decoded = _blend(row[j - 1], decoded, blend_w, 3)
            kept.append(decoded[:, :, :keep_h, :keep_w])
        out_rows.append(torch.cat(kept, dim=3))
    return torch.cat(out_rows, dim=2)
