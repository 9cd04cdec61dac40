"""Command line entry point (filled in by later steps)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def run() -> None:
    """Placeholder until the worker exists."""
    typer.echo("adaptive-worker: the worker is not built yet")
