"""The TRELLIS-BOX gateway: validation, admission, stage routing and streaming. Holds no model, imports no torch."""
