# fal-ai/pixart-sigma at fal's defaults (1024x1024 square_hd, 35 steps, CFG 4.5, DPM-SOLVER), on the tiny
# random-weight PixArt-Σ (T5 encoder, DiT, VAE of the real architectures).
# Run: python -m benchmarks.run --preset pixart_sigma_demo

endpoint = "fal-ai/pixart-sigma"
weights = "demo"

arguments = {"prompt": "an astronaut riding a horse on the moon, detailed, cinematic"}
seed = 42

paths = ("gateway", "triton_grpc", "in_process", "diffusers")
warmup = 1
repeats = 5

concurrency = (1, 2, 4, 8)
rounds = 1
batch_gain_at = 4
