"""The application layer: the ``target-sft`` console script (:func:`main`), the quickstart job and the demo."""

from targetsft.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
