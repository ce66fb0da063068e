#!/bin/sh
# Entrypoint of the TRELLIS service image.
#   (no argument or flags)  run the preflight, then exec `python -m trellis_service` with the flags
#   preflight [--mode ...]  run only the preflight and print its report
# TRELLISBOX_PREFLIGHT: auto (default: strict when TRELLISBOX_TRELLIS_BACKEND=trellis, else warn),
# strict (exit 78 naming what is missing), warn (report and start anyway; the service's own preflight
# then refuses readiness with its message), off.
set -eu
PY="${TRELLISBOX_PYTHON:-python}"
PREFLIGHT=/opt/trellisbox/trellis_preflight.py

if [ "${1:-}" = "preflight" ]; then
  shift
  exec "$PY" "$PREFLIGHT" "$@"
fi

if [ "${TRELLISBOX_PREFLIGHT:-auto}" != "off" ]; then
  "$PY" "$PREFLIGHT" --mode "${TRELLISBOX_PREFLIGHT:-auto}"
fi

exec "$PY" -m trellis_service "$@"
