# syntax=docker/dockerfile:1.7
# TRELLIS-BOX Serving: the gateway image.
#
# The gateway routes requests and holds no model: `.[gateway]` pulls no torch, and the build fails if
# torch sneaks in through a dependency. Build from the repository root (`make images`):
#   docker build -f docker/gateway.Dockerfile -t trellisbox/gateway:dev .
# docker/gateway.Dockerfile.dockerignore limits the build context to what this image needs.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: a virtual environment with the package and its dependencies --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
RUN pip install '/src[gateway]' \
 && if python -c 'import torch' 2>/dev/null; then echo 'torch must not be in the gateway image' >&2; exit 1; fi \
 && python -c 'import gateway, trellisbox'

# ---- runtime: the venv on a clean base, no compilers, no pip caches, no source tree ----------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="trellisbox-gateway" \
      org.opencontainers.image.description="TRELLIS-BOX Serving gateway (gRPC, no model)"
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRELLISBOX_GATEWAY_HOST=0.0.0.0 \
    TRELLISBOX_GATEWAY_PORT=50051
WORKDIR /home/app
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "gateway"]
