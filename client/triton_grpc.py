"""Call the Triton models directly over gRPC, without the gateway (`generate`: lcm; `infer`: any).

    python client/triton_grpc.py --url 127.0.0.1:8001 --prompt "a black cat" --out cat.png
    python client/triton_grpc.py --image in.png --mask mask.png --strength 0.8 --out inpainted.png

The model is decoupled: it streams one response per denoising step (PROGRESS = [step, total]) and
then one with IMAGES (batch, num_images, H, W, 3) uint8, NSFW and TIMINGS (JSON). Every input has
a leading batch dimension of 1; Triton's dynamic batcher groups concurrent requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import tritonclient.grpc.aio as grpcclient
from PIL import Image
from tritonclient.utils import np_to_triton_dtype


def _input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
    tensor.set_data_from_numpy(value)
    return tensor


async def generate(
    url: str,
    prompt: str,
    seed: int,
    steps: int,
    width: int | None,
    height: int | None,
    *,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    strength: float = 0.8,
    safety_checks: bool = True,
) -> dict:
    """`image` (H, W, 3) uint8 makes it image-to-image, with `mask` (H, W) uint8 (white = fill)
    inpainting; width / height None then take the image's size."""
    inputs = [
        _input("PROMPT", np.array([[prompt.encode()]], dtype=np.object_)),
        _input("SEED", np.array([[seed]], dtype=np.int64)),
        _input("NUM_INFERENCE_STEPS", np.array([[steps]], dtype=np.int32)),
        _input("ENABLE_SAFETY_CHECKS", np.array([[safety_checks]], dtype=np.bool_)),
    ]
    if width is not None and height is not None:
        inputs += [
            _input("WIDTH", np.array([[width]], dtype=np.int32)),
            _input("HEIGHT", np.array([[height]], dtype=np.int32)),
        ]
    if image is not None:
        inputs += [
            _input("IMAGE", np.ascontiguousarray(image[None])),
            _input("STRENGTH", np.array([[strength]], dtype=np.float32)),
        ]
    if mask is not None:
        inputs.append(_input("MASK", np.ascontiguousarray(mask[None])))
    out = await infer(url, "lcm", inputs, request_id=f"grpc-{seed}")
    outputs = out.pop("outputs")
    out["images"] = outputs["IMAGES"][0]  # (num_images, H, W, 3)
    out["nsfw"] = outputs["NSFW"][0].tolist()
    out["timings"] = json.loads(outputs["TIMINGS"].reshape(-1)[0])
    return out


async def infer(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray] | list[grpcclient.InferInput],
    request_id: str = "grpc",
) -> dict:
    """One request to any of the five endpoint models (all decoupled, all with the same protocol): PROGRESS
    [step, total] responses, LOG lines (lora, while a base model loads), then the one carrying IMAGES with
    the rest of the model's outputs. `inputs`: name -> array with a leading batch dimension of 1 (what the
    gateway's `Endpoint.to_triton` builds) or ready InferInputs. Returns {"progress", "log", "outputs"}."""
    if isinstance(inputs, dict):
        inputs = [_input(name, np.ascontiguousarray(value)) for name, value in inputs.items()]
    client = grpcclient.InferenceServerClient(url=url)

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": request_id}

    out: dict = {"progress": [], "log": []}
    try:
        async for result, error in client.stream_infer(inputs_iterator=requests()):
            if error is not None:
                raise RuntimeError(error.message())
            if result.get_output("IMAGES") is not None:
                out["outputs"] = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
                break
            progress = result.as_numpy("PROGRESS")
            if progress is not None:
                out["progress"].append(progress.reshape(-1).tolist())
            elif result.get_output("LOG") is not None:
                out["log"].append(result.as_numpy("LOG").reshape(-1)[0].decode("utf-8", "replace"))
    finally:
        await client.close()
    if "outputs" not in out:
        raise RuntimeError(f"{model}: the response stream ended without a result")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--prompt", default="a black cat with glowing eyes")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=None, help="default 512, or the --image's width")
    parser.add_argument("--height", type=int, default=None, help="default 512, or the --image's height")
    parser.add_argument("--image", help="input image: image-to-image")
    parser.add_argument("--mask", help="mask image, white = fill: inpainting (needs --image)")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--out", default="lcm.png")
    args = parser.parse_args()
    image = np.asarray(Image.open(args.image).convert("RGB")) if args.image else None
    mask = np.asarray(Image.open(args.mask).convert("L")) if args.mask else None
    if image is None and (args.width is None or args.height is None):
        args.width, args.height = args.width or 512, args.height or 512
    out = asyncio.run(
        generate(
            args.url,
            args.prompt,
            args.seed,
            args.steps,
            args.width,
            args.height,
            image=image,
            mask=mask,
            strength=args.strength,
        )
    )
    for step, total in out["progress"]:
        print(f"step {step}/{total}")
    Image.fromarray(out["images"][0]).save(args.out)
    print(f"saved {args.out}; timings {out['timings']}")


if __name__ == "__main__":
    main()
