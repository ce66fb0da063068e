"""What every part of TRELLIS-BOX Serving shares: request parameters, progress and artifact kinds, typed
errors, the image codec, artifact chunking and the proto conversions.

Private: the client, the gateway and the model services import it; it is not a public API (see
:mod:`trellisbox` for that). Nothing here imports torch or a gRPC server.
"""
