"""`python -m erasure ...`: the argparse commands over the library."""

from erasure.cli.main import main

__all__ = ["main"]
