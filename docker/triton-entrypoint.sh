#!/usr/bin/env bash
# Build what is missing (weights from the HF cache, ONNX exports, TensorRT engines for this GPU, all
# cached under $EMBER_VAR_DIR), then run Triton in the foreground as PID 1's child.
set -euo pipefail
python3 -m ember.serve --prepare-only
exec tritonserver \
  --model-repository="$EMBER_MODEL_REPOSITORY" \
  --http-address=127.0.0.1 --grpc-port=8001 --metrics-port=8002 \
  --model-control-mode=none --strict-readiness=true --exit-on-error=true "$@"
