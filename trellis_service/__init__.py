"""The TRELLIS service: image(s) to a textured 3D asset (GLB, Gaussian PLY) over gRPC."""
