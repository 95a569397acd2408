"""CLI commands of this stage."""

import typer


def register(app: typer.Typer) -> None:
    pass


def register_bench(bench_app: typer.Typer) -> None:
    pass
