"""`gru4rec-cli` and `python -m gru4rec`: the CLI (gru4rec/cli.py) behind a Ctrl-C guard that is in
place before its half second of imports (typer, Polars, every stage's commands). Without it an early
Ctrl-C printed Python's KeyboardInterrupt traceback; now it exits 130 with one line."""

from __future__ import annotations

import sys

from gru4rec.errors import EXIT_INTERRUPTED


def main() -> None:
    try:
        from gru4rec.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # later ones are handled inside (train: which epoch --out holds)
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
