# The fal-compatible gateway: no torch, no model code (the [gateway] extra only).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 EMBER_VAR_DIR=/var/lib/ember EMBER_HOST=0.0.0.0 EMBER_TRITON_GRPC_URL=triton:8001
WORKDIR /opt/ember
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[gateway]"
EXPOSE 8443 8444 8445 8446
HEALTHCHECK --interval=5s --timeout=3s CMD python -c "import urllib.request as u,ssl;u.urlopen('https://127.0.0.1:8443/health',context=ssl._create_unverified_context())"
CMD ["python", "-m", "ember.gateway"]
