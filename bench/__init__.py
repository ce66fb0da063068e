"""TRELLIS-BOX serving benchmarks: ``python -m bench`` (see docs/benchmarks.md)."""
