"""`vitscope demo`: capture over real Fashion-MNIST images and print a per-layer summary."""
from __future__ import annotations

import argparse

from vitscope.commands import capture


def configure(parser: argparse.ArgumentParser) -> None:
    capture.configure(parser)


def run(args: argparse.Namespace) -> int:
    return capture.run(args)
