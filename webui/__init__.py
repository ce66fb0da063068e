"""The TRELLIS-BOX web form: a client app in front of the gateway (``trellisbox web``). Imports no torch."""
