from __future__ import annotations

import json

import typer


def policies(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every policy preset with its parameters."""
    from policies import policy_catalog

    catalog = policy_catalog()
    if json_out:
        typer.echo(json.dumps(catalog, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Policy presets", show_lines=True)
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("parameters (defaults)")
    for name, entry in catalog["presets"].items():
        params = "\n".join(f"{k} = {v!r}" for k, v in entry["params"].items()) or "-"
        table.add_row(name, entry["description"], params)
    console = Console()
    console.print(table)
    for name, target in catalog["entry_points"].items():
        console.print(f"entry point [bold]{name}[/bold] -> {target}")
    console.print("Also: any dotted path package.module:ClassName, with parameters as {name: ..., <param>: ...}.")
