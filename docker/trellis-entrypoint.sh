#!/bin/sh
# Entrypoint of the TRELLIS service image.
#   (no argument or flags)  run the preflight, then exec `python -m trellis_service` with the flags
#   preflight [--mode ...]  run only the preflight and print its report
# The preflight is `python -m trellis_service.preflight`: the same checks the service runs before loading.
# TRELLISBOX_PREFLIGHT: auto (default: strict when TRELLISBOX_TRELLIS_BACKEND=trellis, off for preview,
# else warn), strict (exit 78 naming what is missing), warn (report and start anyway; the service's own
# preflight then refuses readiness with its message), off.
set -eu
PY="${TRELLISBOX_PYTHON:-python}"

if [ "${1:-}" = "preflight" ]; then
  shift
  exec "$PY" -m trellis_service.preflight "$@"
fi

if [ "${TRELLISBOX_PREFLIGHT:-auto}" != "off" ]; then
  "$PY" -m trellis_service.preflight --mode "${TRELLISBOX_PREFLIGHT:-auto}"
fi

exec "$PY" -m trellis_service "$@"
