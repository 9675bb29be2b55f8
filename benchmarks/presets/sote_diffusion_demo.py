# fal-ai/stable-cascade/sote-diffusion at fal's defaults (1024x1536, prior 25 steps CFG 8 + decoder 10 steps
# CFG 2), on the tiny random-weight Stable Cascade (prior, decoder, VQGAN). The safety checker is off on
# every path: diffusers' Stable Cascade pipelines have none.
# Run: python -m benchmarks.run --preset sote_diffusion_demo

endpoint = "fal-ai/stable-cascade/sote-diffusion"
weights = "demo"

arguments = {"prompt": "anime girl with silver hair under cherry blossoms", "enable_safety_checker": False}
seed = 42

paths = ("gateway", "triton_grpc", "in_process", "diffusers")
warmup = 1
repeats = 5

concurrency = (1, 2, 4, 8)
rounds = 1
batch_gain_at = 4
