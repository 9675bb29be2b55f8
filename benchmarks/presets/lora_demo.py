# fal-ai/lora at fal's defaults (1024x1024 square_hd, 30 steps, CFG 7.5, the base model's own scheduler), on
# the tiny random-weight SD1.5 base (ember.specs.demo_lora), built into the LoRA model root on first run.
# Run: python -m benchmarks.run --preset lora_demo

endpoint = "fal-ai/lora"
weights = "demo"

arguments = {"prompt": "a watercolor fox in a misty forest, soft light", "model_name": "(set by prepare)"}
seed = 42


def prepare(settings, arguments):
    """The base model: a directory under EMBER_LORA_MODEL_ROOT, named by its absolute path."""
    from ember.specs.demo_lora import build_tiny_sd15

    base = settings.lora_models_dir / "tiny-sd15"
    if not (base / "model_index.json").is_file():
        build_tiny_sd15(base)
    return {**arguments, "model_name": str(base.resolve())}


paths = ("gateway", "triton_grpc", "in_process", "diffusers")
warmup = 1
repeats = 5

concurrency = (1, 2, 4, 8)
rounds = 1
batch_gain_at = 4
