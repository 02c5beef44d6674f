from __future__ import annotations

import typer


def policies(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every policy preset with its parameters."""
    raise typer.Exit(2)
