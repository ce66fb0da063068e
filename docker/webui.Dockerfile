# syntax=docker/dockerfile:1.7
# TRELLIS-BOX Serving: the web app image (Gradio, a gRPC client of the gateway).
#
# No model and no torch: `.[webui]` is the client package, Gradio and Playwright's Python package (the
# browser test's driver; no browser is downloaded into the image). The build fails if torch sneaks in.
# Build from the repository root (`make images`):
#   docker build -f docker/webui.Dockerfile -t trellisbox/webui:dev .
# docker/webui.Dockerfile.dockerignore limits the build context to what this image needs.

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
RUN pip install '/src[webui]' \
 && if python -c 'import torch' 2>/dev/null; then echo 'torch must not be in the webui image' >&2; exit 1; fi \
 && GRADIO_ANALYTICS_ENABLED=False python -c 'import webui.app'

# ---- runtime: the venv on a clean base, no compilers, no pip caches, no source tree ----------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="trellisbox-webui" \
      org.opencontainers.image.description="TRELLIS-BOX Serving web app (Gradio; a client of the gateway)"
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_TEMP_DIR=/tmp/gradio
WORKDIR /home/app
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "webui"]
CMD ["--host", "0.0.0.0", "--port", "8080", "--target", "gateway:50051"]
