"""TRELLIS-BOX Serving: the runtime shared by the gateway, the refiner service and the TRELLIS service.

Nothing in this package imports torch; the gateway installs it without any model dependency.
"""

__version__ = "0.1.0"
