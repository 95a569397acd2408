"""CLI commands of this stage."""

import typer


def register(app: typer.Typer) -> None:
    pass
