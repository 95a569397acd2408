"""`gru4rec-cli`: one typer app; each stage registers its own commands from its own module.

User errors (`UserError`), usage errors (unknown option, bad value), OS errors (unwritable path,
disk full) and running out of memory become one `error:` line on stderr and exit code 2. Exit 1 is reserved for checks that ran and failed (a regression, a failed parity
verification); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys

import typer

from gru4rec.errors import EXIT_USER_ERROR, UserError

app = typer.Typer(
    name="gru4rec-cli",
    help="GRU4Rec session-based recommenders: train, export to ONNX, score, evaluate, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


bench_app = typer.Typer(
    help="Benchmarks: JSON results, measured side by side in one run.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


def _register_all() -> None:
    # Imports are cheap: stage modules import torch/onnx lazily inside their commands.
    from gru4rec import data_commands
    from gru4rec.eval import cli as eval_cli
    from gru4rec.export import cli as export_cli
    from gru4rec.score import cli as score_cli
    from gru4rec.serve import cli as serve_cli
    from gru4rec.train import cli as train_cli

    for module in (data_commands, train_cli, export_cli, score_cli, eval_cli, serve_cli):
        module.register(app)
    for module in (train_cli, score_cli, serve_cli, eval_cli):
        module.register_bench(bench_app)
    score_cli.register_bench_memory(bench_app)


_register_all()


def invocation(ctx) -> list[str]:
    """The arguments of the running command, from a command's `typer.Context` (for messages that
    repeat the command, e.g. how to resume). Kept in the context, not a module global: `python -m
    gru4rec.cli` runs this file as `__main__`, a second copy of the module the commands never see."""
    obj = ctx.find_root().obj if ctx is not None else None
    return list(obj["argv"]) if isinstance(obj, dict) and "argv" in obj else sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = app(args=args, standalone_mode=False, obj={"argv": args})
    except UserError as e:
        _fail(str(e))
    except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except MemoryError:
        _fail("out of memory: use smaller data, batch or layer sizes")
    except RuntimeError as e:  # torch reports allocation failures (CPU and CUDA) as RuntimeError
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        _fail(f"out of memory: use smaller data, batch or layer sizes ({str(e).splitlines()[0][:160]})")
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # typer/click usage errors
            _fail(f"{e.format_message()} (see --help)", e.exit_code)
        raise
    sys.exit(status if isinstance(status, int) else 0)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
