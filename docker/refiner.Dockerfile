# syntax=docker/dockerfile:1.7
# TRELLIS-BOX Serving: the SDXL-refiner service image.
#
# A CUDA base plus PyTorch (torch==2.13.0, the CUDA build from PyPI, which carries its own CUDA
# libraries) and diffusers, through the project's `.[refiner]` extra. Weights are never baked in: they
# live on the weights volume mounted at /weights (see k8s/weights and docs/deploy.md) and are read
# offline (HF_HUB_OFFLINE=1). The same image runs the one-off weights download Job, with
# HF_HUB_OFFLINE=0 set by that Job only.
#   docker build -f docker/refiner.Dockerfile -t trellisbox/refiner:dev .

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- build: venv with torch, diffusers and the service ---------------------------------------------
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Optional: another wheel index for a different CUDA flavour of torch==2.13.0,
# e.g. --build-arg TORCH_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_EXTRA_INDEX_URL=""
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
RUN if [ -n "${TORCH_EXTRA_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_EXTRA_INDEX_URL}"; fi \
 && pip install '/src[refiner]' \
 && python -c 'import torch, diffusers, kubernetes, refiner_service; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# ---- runtime: the venv on the same CUDA base, without pip caches or the source tree ------------------
FROM ${CUDA_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="trellisbox-refiner" \
      org.opencontainers.image.description="TRELLIS-BOX Serving SDXL-refiner service (weights mounted, never baked in)"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /weights /var/cache/trellisbox \
 && chown 10001:10001 /var/cache/trellisbox
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/weights/huggingface \
    TORCH_HOME=/weights/torch \
    U2NET_HOME=/weights/u2net \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    XDG_CACHE_HOME=/var/cache/trellisbox \
    TRITON_CACHE_DIR=/var/cache/trellisbox/triton \
    MPLCONFIGDIR=/var/cache/trellisbox/matplotlib \
    TRELLISBOX_REFINER_HOST=0.0.0.0 \
    TRELLISBOX_REFINER_PORT=50052
WORKDIR /home/app
USER 10001:10001
EXPOSE 50052 9090
ENTRYPOINT ["python", "-m", "refiner_service"]
