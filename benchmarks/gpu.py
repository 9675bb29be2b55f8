"""The GPU benchmark, in one call: ember's torch runtime vs diffusers eager fp16 on full-size architectures.

    python -m benchmarks.gpu                       # on the GPU machine; writes benchmarks/results/gpu-<device>.*
    python -m benchmarks.gpu --tiny --device cpu   # the same code on tiny shapes (tests/benchmarks)

Each case replays the network calls its pipeline makes at fal's default settings (text encoders once, the
denoiser once per step at the CFG batch, the decoder once), on random-weight models built on the device from
the real configs (benchmarks/archs.py). Two runtimes run the same modules in the same process:

- diffusers eager fp16: the module as diffusers runs it (fp16, NCHW, eager, SDPA attention);
- ember torch: ember.runtime.torch_runner's recipe (fp16, channels_last, torch.compile
  max-autotune-no-cudagraphs, one CUDA graph per shape via ShapeGraphs), warmed up before timing.

Pipeline time = sum over its networks of (calls x median time per call); scheduler arithmetic is not timed
(microseconds per step). Also per case: FLOPs (FlopCounterMode) and the ideal time at the GPU's dense fp16
peak, and peak memory. Plus batched SDXL at 1024 px, 20 steps: images/s against batch size.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import archs
from benchmarks.flops import count_flops, peak_tflops

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Call:
    """One network of a pipeline: how to build it, its inputs, and how often the pipeline calls it."""

    name: str
    build: Callable[[float], nn.Module]  # scale -> module (fp32, CPU; moved and cast by the runtime)
    inputs: Callable[[int, float], tuple[torch.Tensor, ...]]  # (batch, scale) -> positional args
    calls: int
    batch: int
    fp32: bool = False  # SDXL's VAE runs in fp32 (diffusers upcasts it: fp16 overflows)


class Positional(nn.Module):
    """Adapts a diffusers/transformers model to positional tensor inputs -> one tensor (compile/graph friendly)."""

    def __init__(self, model: nn.Module, forward: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self._forward(self.model, *args)


def _ids(batch: int, length: int = 77, vocab: int = 49406) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def _latent(batch: int, channels: int, side: int) -> torch.Tensor:
    return torch.randn(batch, channels, side, side)


def _text(kind: str, config: dict[str, Any]) -> Callable[[float], nn.Module]:
    return lambda s: Positional(archs.build(kind, archs.shrink(config, s)), lambda m, ids: m(ids)[0])


def _hidden(config: dict[str, Any], key: str, scale: float) -> int:
    return int(archs.shrink(config, scale)[key])


def _vae(config: dict[str, Any]) -> Callable[[float], nn.Module]:
    return lambda s: Positional(archs.build("vae", archs.shrink(config, s)), lambda m, z: m.decode(z).sample)


def _unet(config: dict[str, Any]) -> Callable[[float], nn.Module]:
    return lambda s: Positional(
        archs.build("unet", archs.shrink(config, s)), lambda m, x, t, e, *rest: m(x, t, e, *rest).sample
    )


def sd15_lcm(size: int) -> list[Call]:
    """fal-ai/lcm: 512 px, 4 steps, no CFG (guidance is the w-embedding)."""
    lat = size // 8
    unet_cfg = archs.SD15_LCM_UNET

    def unet_inputs(b: int, s: float) -> tuple[torch.Tensor, ...]:
        return (
            _latent(b, 4, lat),
            torch.full((b,), 999.0),
            torch.randn(b, 77, _hidden(unet_cfg, "cross_attention_dim", s)),
            torch.randn(b, 256),
        )

    unet = lambda s: Positional(
        archs.build("unet", archs.shrink(unet_cfg, s)),
        lambda m, x, t, e, w: m(x, t, e, timestep_cond=w).sample,
    )
    return [
        Call("text_encoder", _text("clip", archs.CLIP_L), lambda b, s: (_ids(b),), 1, 1),
        Call("unet", unet, unet_inputs, 4, 1),
        Call("vae_decoder", _vae(archs.SD_VAE), lambda b, s: (_latent(b, 4, lat),), 1, 1),
    ]


def sdxl(size: int, steps: int, images: int = 1) -> list[Call]:
    """fal-ai/lora-style SDXL: CFG doubles the UNet batch; two text encoders; fp32 VAE."""
    lat, b = size // 8, 2 * images
    cfg = archs.SDXL_UNET

    def unet_inputs(batch: int, s: float) -> tuple[torch.Tensor, ...]:
        c = archs.shrink(cfg, s)
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        return (
            _latent(batch, 4, lat),
            torch.full((batch,), 999.0),
            torch.randn(batch, 77, c["cross_attention_dim"]),
            torch.randn(batch, pooled),
            torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
        )

    unet = lambda s: Positional(
        archs.build("unet", archs.shrink(cfg, s)),
        lambda m, x, t, e, pooled, ids: (
            m(x, t, e, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        ),
    )
    return [
        Call("text_encoder", _text("clip", archs.CLIP_L), lambda n, s: (_ids(n),), 1, b),
        Call("text_encoder_2", _text("clip_projection", archs.CLIP_BIGG), lambda n, s: (_ids(n),), 1, b),
        Call("unet", unet, unet_inputs, steps, b),
        Call("vae_decoder", _vae(archs.SDXL_VAE), lambda n, s: (_latent(n, 4, lat),), 1, images, fp32=True),
    ]


def pixart_sigma(size: int, steps: int) -> list[Call]:
    """fal-ai/pixart-sigma: T5-XXL (300 tokens), the DiT with CFG, SDXL's VAE (fp16 here, as diffusers runs it)."""
    lat = size // 8
    cfg = archs.PIXART_SIGMA

    def dit_inputs(b: int, s: float) -> tuple[torch.Tensor, ...]:
        c = archs.shrink(cfg, s)
        return (_latent(b, 4, lat), torch.full((b,), 999.0), torch.randn(b, 300, c["caption_channels"]))

    dit = lambda s: Positional(
        archs.build("pixart", archs.shrink(cfg, s)),
        lambda m, x, t, e: (
            m(
                x,
                encoder_hidden_states=e,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        ),
    )
    t5 = lambda s: Positional(archs.build("t5", archs.shrink(archs.T5_XXL, s)), lambda m, ids: m(ids)[0])
    return [
        Call("text_encoder", t5, lambda b, s: (_ids(b, 300, 32000),), 1, 2),
        Call("transformer", dit, dit_inputs, steps, 2),
        Call("vae_decoder", _vae(archs.SDXL_VAE), lambda b, s: (_latent(b, 4, lat),), 1, 1),
    ]


def stable_cascade(size: int, prior_steps: int, decoder_steps: int) -> list[Call]:
    """fal-ai/stable-cascade: prior at 24x24 (1024/42.67) with CFG, decoder at 256x256 without, VQGAN decode."""
    prior_side, dec_side = 24 * size // 1024, size // 4

    def prior_inputs(b: int, s: float) -> tuple[torch.Tensor, ...]:
        c = archs.shrink(archs.CASCADE_PRIOR, s)
        return (
            _latent(b, 16, prior_side),
            torch.full((b,), 0.5),
            torch.randn(b, 77, c["clip_text_in_channels"]),
            torch.randn(b, 1, c["clip_text_pooled_in_channels"]),
            torch.zeros(b, 1, c["clip_image_in_channels"]),
        )

    def decoder_inputs(b: int, s: float) -> tuple[torch.Tensor, ...]:
        c = archs.shrink(archs.CASCADE_DECODER, s)
        return (
            _latent(b, 4, dec_side),
            torch.full((b,), 0.5),
            _latent(b, 16, prior_side),
            torch.randn(b, 1, c["clip_text_pooled_in_channels"]),
        )

    prior = lambda s: Positional(
        archs.build("cascade", archs.shrink(archs.CASCADE_PRIOR, s)),
        lambda m, x, r, text, pooled, img: (
            m(x, r, clip_text=text, clip_text_pooled=pooled, clip_img=img).sample
        ),
    )
    decoder = lambda s: Positional(
        archs.build("cascade", archs.shrink(archs.CASCADE_DECODER, s)),
        lambda m, x, r, effnet, pooled: m(x, r, effnet=effnet, clip_text_pooled=pooled).sample,
    )

    def vqgan(s: float) -> nn.Module:
        from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

        return Positional(PaellaVQModel().eval(), lambda m, z: m.decode(z).sample)

    return [
        Call("text_encoder", _text("clip_projection", archs.CLIP_BIGG), lambda b, s: (_ids(b),), 1, 2),
        Call("prior", prior, prior_inputs, prior_steps, 2),
        Call("decoder", decoder, decoder_inputs, decoder_steps, 1),
        Call("vqgan", vqgan, lambda b, s: (_latent(b, 4, dec_side),), 1, 1),
    ]


def illusion(size: int, steps: int) -> list[Call]:
    """fal-ai/illusion-diffusion: SD1.5 + the QR-monster ControlNet, CFG, 40 steps at 512 px."""
    lat = size // 8

    class UNetWithControl(nn.Module):
        def __init__(self, s: float):
            super().__init__()
            self.controlnet = archs.build("controlnet", archs.shrink(archs.SD15_CONTROLNET, s))
            self.unet = archs.build("unet", archs.shrink(archs.SD15_UNET, s))

        def forward(
            self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, image: torch.Tensor
        ) -> torch.Tensor:
            down, mid = self.controlnet(x, t, e, controlnet_cond=image, return_dict=False)
            return self.unet(
                x, t, e, down_block_additional_residuals=down, mid_block_additional_residual=mid
            ).sample

    def inputs(b: int, s: float) -> tuple[torch.Tensor, ...]:
        hidden = _hidden(archs.SD15_UNET, "cross_attention_dim", s)
        return (
            _latent(b, 4, lat),
            torch.full((b,), 999.0),
            torch.randn(b, 77, hidden),
            torch.rand(b, 3, size, size),
        )

    return [
        Call("text_encoder", _text("clip", archs.CLIP_L), lambda b, s: (_ids(b),), 1, 2),
        Call("controlnet+unet", UNetWithControl, inputs, steps, 2),
        Call("vae_decoder", _vae(archs.SD_VAE), lambda b, s: (_latent(b, 4, lat),), 1, 1),
    ]


CASES: dict[str, Callable[[int], list[Call]]] = {
    # name: size -> calls (fal's default settings of each endpoint)
    "lcm_sd15_512_4steps": lambda size: sd15_lcm(size),
    "sdxl_1024_30steps_cfg": lambda size: sdxl(size, 30),
    "pixart_sigma_1024_35steps_cfg": lambda size: pixart_sigma(size, 35),
    "stable_cascade_1024_prior20cfg_decoder10": lambda size: stable_cascade(size, 20, 10),
    "illusion_512_40steps_cfg": lambda size: illusion(size, 40),
}
SIZES = {"lcm_sd15_512_4steps": 512, "illusion_512_40steps_cfg": 512}  # others: 1024


def _prepare(module: nn.Module, runtime: str, device: torch.device, dtype: torch.dtype) -> Callable[..., Any]:
    from ember.runtime.torch_runner import ShapeGraphs, optimize_module

    if runtime == "diffusers_eager":
        module = module.to(device=device, dtype=dtype).eval()
        return module
    module = optimize_module(module, device, dtype)
    if device.type != "cuda":
        return module  # torch.compile and CUDA graphs are CUDA-only in ember's recipe
    return ShapeGraphs(torch.compile(module, mode="max-autotune-no-cudagraphs"), device)


def _cast(
    args: tuple[torch.Tensor, ...], device: torch.device, dtype: torch.dtype, nhwc: bool
) -> list[torch.Tensor]:
    out = []
    for a in args:
        a = a.to(device)
        if a.is_floating_point():
            a = a.to(dtype)
            if nhwc and a.dim() == 4 and device.type == "cuda":
                a = a.contiguous(memory_format=torch.channels_last)
        out.append(a)
    return out


def _median_seconds(
    fn: Callable[..., Any], args: list[torch.Tensor], iters: int, device: torch.device
) -> float:
    for _ in range(2):
        fn(*args)  # warm-up: compilation, autotuning, graph capture, cuDNN algorithm search
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(
    name: str, calls: list[Call], device: torch.device, dtype: torch.dtype, scale: float, iters: int
) -> dict[str, Any]:
    """Both runtimes on every network of one case; modules are built once per network and freed after."""
    result: dict[str, Any] = {"networks": {}, "flops": 0}
    totals = {"diffusers_eager": 0.0, "ember_torch": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for call in calls:
        torch.manual_seed(0)
        module = call.build(scale)
        net_dtype = torch.float32 if call.fp32 else dtype
        args = call.inputs(call.batch, scale)
        entry: dict[str, Any] = {
            "calls": call.calls,
            "batch": call.batch,
            "parameters": archs.parameters(module),
        }
        with torch.inference_mode():
            eager_args = _cast(args, device, net_dtype, nhwc=False)
            eager = _prepare(module, "diffusers_eager", device, net_dtype)
            entry["flops_per_call"] = count_flops(eager, eager_args)
            entry["diffusers_eager_s"] = _median_seconds(eager, eager_args, iters, device)
            fast = _prepare(module, "ember_torch", device, net_dtype)
            fast_args = _cast(args, device, net_dtype, nhwc=True)
            entry["ember_torch_s"] = _median_seconds(fast, fast_args, iters, device)
        for runtime in totals:
            totals[runtime] += call.calls * entry[f"{runtime}_s"]
        result["flops"] += call.calls * entry["flops_per_call"]
        result["networks"][call.name] = entry
        del module, eager, fast
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["pipeline_s"] = totals
    result["speedup"] = totals["diffusers_eager"] / totals["ember_torch"]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(torch.cuda.get_device_name(device))
        if peak:
            result["ideal_s"] = result["flops"] / (peak * 1e12)
            result["ember_over_ideal"] = totals["ember_torch"] / result["ideal_s"]
    return result


def batched_sdxl(
    device: torch.device, dtype: torch.dtype, scale: float, size: int, batches: tuple[int, ...], iters: int
) -> dict[str, Any]:
    """SDXL UNet x 20 steps at CFG batch 2n + VAE: images/s for n images per call (ember torch runtime)."""
    out = {}
    for n in batches:
        case = run_case(f"sdxl_batch{n}", sdxl(size, 20, images=n), device, dtype, scale, iters)
        out[str(n)] = {
            "seconds": case["pipeline_s"]["ember_torch"],
            "images_per_s": n / case["pipeline_s"]["ember_torch"],
            "diffusers_images_per_s": n / case["pipeline_s"]["diffusers_eager"],
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU benchmark on {report['device']} ({report['started']})",
        "",
        (
            f"torch {report['torch']}, dtype {report['dtype']}, scale {report['scale']} "
            "(1 = full-size architectures, random weights)."
        ),
        "",
        "| case | diffusers eager s | ember torch s | speed-up | ideal s | ember / ideal | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, case in report["cases"].items():
        p = case["pipeline_s"]
        ideal = f"{case['ideal_s']:.3f}" if "ideal_s" in case else "-"
        over = f"{case['ember_over_ideal']:.2f}" if "ember_over_ideal" in case else "-"
        mem = f"{case['peak_memory_gib']:.1f}" if "peak_memory_gib" in case else "-"
        lines.append(
            f"| {name} | {p['diffusers_eager']:.3f} | {p['ember_torch']:.3f} | {case['speedup']:.2f}x | "
            f"{ideal} | {over} | {mem} |"
        )
    lines += [
        "",
        "## Batched SDXL (1024 px, 20 steps, CFG)",
        "",
        "| images per call | images/s (ember) | images/s (diffusers eager) |",
        "|---:|---:|---:|",
    ]
    for n, v in report.get("sdxl_batched", {}).items():
        lines.append(f"| {n} | {v['images_per_s']:.3f} | {v['diffusers_images_per_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="scaled-down models and sizes (tests, CPU)")
    parser.add_argument("--cases", help="comma list of case names (default: all)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batches", default="1,2,4,8", help="SDXL batch sizes for images/s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: run this on the GPU machine (benchmarks/NOTES.md), or pass --tiny --device cpu"
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # Tiny: 64 px (Stable Cascade's decoder needs 256 px: patch 4, then three 2x downsamplings).
    scale, size_of = (
        (0.05, lambda n: 256 if "cascade" in n else 64) if args.tiny else (1.0, lambda n: SIZES.get(n, 1024))
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (SDXL VAE) use TF32 tensor cores
        torch.backends.cudnn.benchmark = True
    names = args.cases.split(",") if args.cases else list(CASES)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": device_name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "scale": scale,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": {},
    }
    for name in names:
        print(f"[gpu-bench] {name}", flush=True)
        report["cases"][name] = run_case(name, CASES[name](size_of(name)), device, dtype, scale, args.iters)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ()
    if batches:
        report["sdxl_batched"] = batched_sdxl(
            device, dtype, scale, 64 if args.tiny else 1024, batches, args.iters
        )
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ("-tiny" if args.tiny else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"gpu-{slug}.md").write_text(markdown(report))
    print(f"wrote {args.out}/gpu-{slug}.json and .md")
    return report


if __name__ == "__main__":
    main()
