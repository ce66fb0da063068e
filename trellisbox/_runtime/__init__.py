"""The server runtime every TRELLIS-BOX service imports: settings loader, server bootstrap (health,
reflection, metrics, the error interceptor), the model-service skeleton, the model worker, GPU devices and
the GPU lease.

Private: not a public API. Nothing here imports torch at module level.
"""
