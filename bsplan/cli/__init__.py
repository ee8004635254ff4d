"""The `bsplan` command: the typer app (app.py) and the rich tables (render.py), the only code
that imports typer or rich. It parses, calls the core, and renders. `main` is the console entry point."""

from bsplan.cli.app import main

__all__ = ["main"]
