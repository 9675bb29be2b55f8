"""A stand-in for the `lcm` Triton model with the same config (inputs, outputs, decoupled): it renders
a flat image whose colour comes from the seed, one PROGRESS response per step (`STEP_SECONDS` apart),
so that the gateway's worker can be tested against a real tritonserver without the diffusion pipeline.

Prompts steer it: "fail invalid" answers INVALID_ARG, "fail internal" answers INTERNAL. A config
parameter `step_seconds` (tests/stacks.py writes it) overrides STEP_SECONDS. A gRPC stream
carries only an error's message, not its TritonError code, so a refused input is told from a model
fault by the message: it starts with "invalid input:" (ember.gateway.backend._classify).
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
STEP_SECONDS = 0.05


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.step_seconds = float(parameters.get("step_seconds", {}).get("string_value", STEP_SECONDS))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            prompt = _scalar(request, "PROMPT", "")
            if prompt.startswith("fail "):
                if prompt == "fail invalid":
                    error = pb_utils.TritonError(f"invalid input: stand-in: {prompt}", pb_utils.TritonError.INVALID_ARG)
                else:
                    error = pb_utils.TritonError(f"stand-in: {prompt}", pb_utils.TritonError.INTERNAL)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                continue
            seed = int(_scalar(request, "SEED", 0))
            steps = int(_scalar(request, "NUM_INFERENCE_STEPS", 4))
            n = int(_scalar(request, "NUM_IMAGES", 1))
            width, height = int(_scalar(request, "WIDTH", 512)), int(_scalar(request, "HEIGHT", 512))
            cancelled = False
            for step in range(1, steps + 1):
                time.sleep(self.step_seconds)
                if request.is_cancelled():
                    cancelled = True
                    break
                progress = np.array([[step, steps]], dtype=np.int32)
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROGRESS", progress)]))
            if cancelled:
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
                continue
            colour = np.array([seed % 256, (seed // 256) % 256, (seed // 65536) % 256], dtype=np.uint8)
            images = np.broadcast_to(colour, (1, n, height, width, 3)).copy()
            outputs = [
                pb_utils.Tensor("IMAGES", images),
                pb_utils.Tensor("NSFW", np.zeros((1, n), dtype=bool)),
                pb_utils.Tensor("TIMINGS", np.array([[json.dumps({"inference": 0.1}).encode()]], dtype=np.object_)),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
            sender.send(flags=FINAL)
