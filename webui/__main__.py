"""``python -m webui``: the web app (as ``trellisbox web``; the container image's entry point)."""

import sys

from webui.app import main

sys.exit(main())
