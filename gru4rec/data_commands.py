"""`gru4rec-cli data ...`: synthetic data, preprocessing protocols, statistics."""

import typer


def register(app: typer.Typer) -> None:
    pass
