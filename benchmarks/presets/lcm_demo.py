# fal-ai/lcm at fal's defaults, on the tiny demo model (CPU): what the serving stack costs on top of the
# pipeline, what batching gains, and ONNX Runtime vs torch on the full-size SD1.5 UNet.
# Run: python -m benchmarks.run --preset lcm_demo   (or `make bench`)

endpoint = "fal-ai/lcm"
weights = "demo"  # the tiny random-weight LCM SD1.5 (src/ember/models.toml `demo`)

# The fal request; every field left out takes fal's default (fal-schemas.md): 512x512, 4 steps, guidance 1,
# one image. The safety checker is off on every path: the diffusers baseline runs without one.
arguments = {
    "prompt": "a black cat with glowing eyes, cute, adorable, disney, pixar, highly detailed, 8k",
    "enable_safety_checks": False,
}
seed = 42

# Latency: each path runs `repeats` timed requests after `warmup` untimed ones, interleaved round by round
# so that load from other processes on a shared machine hits every path alike.
paths = ("gateway", "triton_grpc", "in_process", "diffusers")
warmup = 2
repeats = 12

# Throughput through Triton's dynamic batcher: `rounds` x concurrency requests at each concurrency.
concurrency = (1, 2, 4, 8, 16, 32)
rounds = 2
batch_gain_at = 8  # also timed in process: one pipeline call of 8 requests vs 8 calls of one

# ONNX Runtime vs torch eager, fp32 CPU, on the full-size SD1.5 LCM UNet (random weights, real config).
# threads: 0 = every visible core (how it serves); 1 = one core each, which isolates kernel quality from
# OpenMP barrier stalls when other processes oversubscribe the cores (see benchmarks/NOTES.md).
ort_vs_torch = {"height": 256, "width": 256, "batch": 1, "repeats": 5, "scale": 1.0, "threads": (0, 1)}
