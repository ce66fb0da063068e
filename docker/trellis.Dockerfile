# syntax=docker/dockerfile:1.7
# TRELLIS-BOX Serving: the TRELLIS image-to-3D service image.
#
# The project never carries or builds TRELLIS: this image starts FROM a base image that already holds
# a working TRELLIS (its Python, torch, CUDA extensions: spconv, flash-attn or xformers, the Gaussian
# rasterizer, nvdiffrast), named by the TRELLIS_BASE_IMAGE build argument, and installs the service
# (`.[trellis]`) on top. At start the entrypoint runs the service's own preflight
# (`python -m trellis_service.preflight`, the checks the service runs before loading), which names what
# is missing from that contract; `docker run --gpus all IMAGE preflight` runs it alone.
#   docker build -f docker/trellis.Dockerfile --build-arg TRELLIS_BASE_IMAGE=registry/trellis:tag \
#     -t trellisbox/trellis:dev .
#
# Build arguments:
#   TRELLIS_BASE_IMAGE  required; the image holding TRELLIS (no default on purpose).
#   TRELLIS_PYTHON      the interpreter of that image that imports trellis (default: python).
#   TRELLIS_HOME        optional folder of the TRELLIS checkout; made readable for the non-root user.
#   PIN_BASE_PACKAGES   1 (default): every package the base already has keeps its exact version, so
#                       installing the service can never upgrade torch or numpy under TRELLIS's
#                       compiled extensions; a conflict fails the build and names the package.

ARG TRELLIS_BASE_IMAGE
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- wheel: build the project's wheel (pure Python) away from the base image ------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: the TRELLIS base plus the service -------------------------------------------------------
FROM ${TRELLIS_BASE_IMAGE} AS runtime
ARG TRELLIS_PYTHON=python
ARG TRELLIS_HOME=""
ARG PIN_BASE_PACKAGES=1
LABEL org.opencontainers.image.title="trellisbox-trellis" \
      org.opencontainers.image.description="TRELLIS-BOX Serving TRELLIS service (on a TRELLIS base image; weights mounted)"
USER 0
COPY --from=wheel /wheels /tmp/trellisbox-wheels
RUN set -eu; \
    PY="${TRELLIS_PYTHON}"; \
    "$PY" -m pip list --format=freeze > /tmp/base-constraints.txt; \
    if [ "${PIN_BASE_PACKAGES}" != "1" ]; then : > /tmp/base-constraints.txt; fi; \
    WHEEL="$(ls /tmp/trellisbox-wheels/*.whl)"; \
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-cache-dir --disable-pip-version-check \
      -c /tmp/base-constraints.txt "${WHEEL}[trellis]"; \
    rm -rf /tmp/trellisbox-wheels /tmp/base-constraints.txt; \
    if [ -n "${TRELLIS_HOME}" ]; then chmod -R a+rX "${TRELLIS_HOME}"; fi; \
    if ! getent group 10001 >/dev/null; then groupadd --system --gid 10001 app; fi; \
    if ! getent passwd 10001 >/dev/null; then \
      useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app; \
    fi; \
    mkdir -p /opt/trellisbox /weights /var/cache/trellisbox; \
    chown 10001:10001 /var/cache/trellisbox
COPY --chmod=0755 docker/trellis-entrypoint.sh /opt/trellisbox/entrypoint.sh
ENV TRELLISBOX_PYTHON=${TRELLIS_PYTHON} \
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
    TRELLISBOX_TRELLIS_HOST=0.0.0.0 \
    TRELLISBOX_TRELLIS_PORT=50053
WORKDIR /home/app
USER 10001:10001
EXPOSE 50053 9090
ENTRYPOINT ["/opt/trellisbox/entrypoint.sh"]
