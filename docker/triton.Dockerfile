# Triton with ember's endpoint models, for NVIDIA GPUs.
# Base: NGC tritonserver 24.12 = Triton 2.53, Ubuntu 24.04 with Python 3.12, CUDA 12.6.3, TensorRT 10.7
# (NVIDIA's release notes for 24.12). The Python backend stub runs the image's python3.12, so ember and
# its pinned dependencies are installed into that interpreter (PEP 668: --break-system-packages).
# torch comes from PyTorch's CUDA index (TORCH_INDEX): its wheels bundle their own CUDA runtime, so only
# the host driver must be new enough for it (cu126: >= 560; pick cu128 for Blackwell GPUs).
# The TensorRT Python bindings match the image's TensorRT (10.7): engines built by `python -m export engines`
# inside this image load in this image. A plan is tied to the GPU's compute capability and the TensorRT
# version: it is rebuilt (cached under /var/lib/ember) when either changes.
ARG TRITON_VERSION=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126

ENV PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    EMBER_VAR_DIR=/var/lib/ember EMBER_RUNTIME=tensorrt EMBER_DEVICE=cuda EMBER_DTYPE=float16 \
    EMBER_MODEL_REPOSITORY=/opt/ember/model_repository HF_HOME=/var/cache/huggingface
WORKDIR /opt/ember
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --extra-index-url "${TORCH_INDEX}" ".[pipeline,export]" \
 && pip install tensorrt-cu12-bindings==10.7.0 tensorrt-cu12-libs==10.7.0 \
 && pip install --no-deps "$(python3 -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['ember']['no-deps']))")"
COPY model_repository ./model_repository
# The export CLI: `docker compose run --rm triton python3 -m export engines ...` builds engines ahead of time.
COPY export ./export
COPY docker/triton-entrypoint.sh /usr/local/bin/ember-triton
# Inside the compose network only; never published to the host (DESIGN.md "Security defaults").
EXPOSE 8001 8002
# First start builds ONNX exports and TensorRT engines for every served model (SDXL-size UNets take ~10 min
# each cold, ~2 min with the timing cache), hence the long start period; later starts find them cached.
HEALTHCHECK --interval=10s --timeout=3s --start-period=1800s CMD curl -fs localhost:8000/v2/health/ready || exit 1
ENTRYPOINT ["/usr/local/bin/ember-triton"]
