# fal-ai/illusion-diffusion at fal's defaults (1024x1024 square_hd, 40 steps, CFG 7.5, Euler, ControlNet
# scale 1), on the tiny random-weight SD1.5 + QR-monster ControlNet; the control image is a spiral drawn here
# and sent as a data: URI (the gateway's fetcher decodes those as it fetches URLs).
# Run: python -m benchmarks.run --preset illusion_diffusion_demo

endpoint = "fal-ai/illusion-diffusion"
weights = "demo"

arguments = {
    "prompt": "(masterpiece:1.4), (best quality), (detailed), medieval village, spiral",
    "image_url": "",
}
seed = 42


def prepare(settings, arguments):
    """A black-and-white spiral, 512 x 512 PNG, as a data: URI."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[-1:1:512j, -1:1:512j]
    spiral = np.sin(8 * np.arctan2(y, x) + 40 * np.hypot(x, y)) > 0
    buffer = io.BytesIO()
    Image.fromarray((spiral * 255).astype(np.uint8)).convert("RGB").save(buffer, format="PNG")
    return {**arguments, "image_url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}


paths = ("gateway", "triton_grpc", "in_process", "diffusers")
warmup = 1
repeats = 5

concurrency = (1, 2, 4, 8)
rounds = 1
batch_gain_at = 4
