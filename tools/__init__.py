"""Project tools run as scripts (python tools/NAME.py); a package so tests and mypy can import them."""
