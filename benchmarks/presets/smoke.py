# The smallest run that goes through every part of the runner (tests/benchmarks): no servers, tiny sizes,
# a scaled-down UNet for the ONNX Runtime vs torch part. Its numbers mean nothing.

endpoint = "fal-ai/lcm"
weights = "demo"

arguments = {
    "prompt": "a black cat",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 2,
    "enable_safety_checks": False,
}
seed = 0

paths = ("in_process", "diffusers")
warmup = 1
repeats = 2

concurrency = (1, 2)
rounds = 1
batch_gain_at = 2

ort_vs_torch = {"height": 64, "width": 64, "batch": 1, "repeats": 1, "scale": 0.1, "threads": (1,)}
