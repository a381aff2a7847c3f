"""The ``modelmerge`` command line (the only package that imports typer)."""

from __future__ import annotations


def main() -> None:
    """Console-script entry point."""
    from modelmerge.cli.app import app

    app(prog_name="modelmerge")
