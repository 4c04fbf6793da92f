# octoflux on one NVIDIA GPU. Weights are mounted, never baked in:
#   docker build -t octoflux .
#   docker run --gpus '"device=0"' -p 8000:8000 -v /srv/FLUX.1-dev:/models/FLUX.1-dev:ro \
#     -v octoflux-cache:/cache -e OCTOFLUX_API_KEYS=... octoflux [--optimize fp8 ...]
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip \
    && pip install torch

WORKDIR /app
# README.m[d]: the package's readme if present (a glob that matches nothing is skipped).
COPY pyproject.toml README.m[d] ./
COPY octoflux ./octoflux
COPY benchmarks ./benchmarks
RUN touch README.md && pip install ".[gpu,bench,ray]"

RUN useradd --create-home --uid 1000 octoflux && mkdir -p /cache /models && chown octoflux /cache
USER octoflux
# Compiled kernels survive restarts on the /cache volume, so re-warming is much faster.
ENV HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/hf \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    OCTOFLUX_MODEL=/models/FLUX.1-dev \
    OCTOFLUX_DEVICE=cuda \
    OCTOFLUX_HOST=0.0.0.0 \
    OCTOFLUX_PORT=8000 \
    OCTOFLUX_OPTIMIZE=compile \
    OCTOFLUX_STATE_DIR=/cache/state
VOLUME ["/models", "/cache"]
EXPOSE 8000

# Loading, compiling and warming every supported size (--warmup-sizes auto) can take minutes: /readyz stays 503
# until then, and a load balancer sends no traffic before it is 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${OCTOFLUX_PORT}/readyz" || exit 1

ENTRYPOINT ["octoflux", "serve"]
