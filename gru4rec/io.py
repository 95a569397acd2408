"""Atomic file writes: a crash leaves either the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gru4rec.errors import UserError


def _cannot(path: Path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write ({e.strerror or e})")


def check_output_file(path: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """Refuse, before any work is done, an output path that cannot become a regular file: an
    existing directory or device, a parent that is a file, an unwritable folder, or one of `inputs`."""
    path = Path(path)
    if path.is_symlink():  # write through a link to a file rather than replace the link itself
        path = path.resolve()
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise UserError(f"{path}: output path is {kind}")
    for other in inputs:
        if other is not None:
            _refuse_input_clash(path, str(other))
    check_output_dir(path.parent)
    return path


DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".txt", ".dat")


def _refuse_input_clash(path: Path, source: str) -> None:
    """An output must not be an input file, nor a data file inside an input folder or glob root
    (the next run would read it as events)."""
    target = path.resolve()
    wild = [i for i, part in enumerate(Path(source).parts) if any(ch in part for ch in "*?[")]
    if wild:
        root = Path(*Path(source).parts[: wild[0]]) if wild[0] else Path(".")
        if target.suffix.lower() in DATA_SUFFIXES and target.is_relative_to(root.resolve()):
            raise UserError(f"{path}: output would land among the input files matched by {source}")
        return
    src = Path(source).resolve()
    if target == src:
        raise UserError(f"{path}: output would overwrite an input file")
    if src.is_dir() and target.is_relative_to(src) and target.suffix.lower() in DATA_SUFFIXES:
        raise UserError(f"{path}: output would land inside the input folder {source}")


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create the folder `path` (and parents) now; refuse one that cannot be written into."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path}: output folder path is an existing file") from None
    except OSError as e:
        raise _cannot(path, e) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: output folder is not writable")
    return path


def _temp_beside(path: Path) -> str:
    """Create the temporary file that `atomic_path` writes before renaming it over `path`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot(path, e) from None
    os.close(fd)
    return tmp


def probe_output_file(path: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """`check_output_file`, then really create (and remove) the temporary file an atomic write of
    `path` will need: catches what permission bits do not tell (a read-only mount, a name too long
    once the temporary suffix is added, no space for a new entry) before hours of work, not after."""
    path = check_output_file(path, inputs=inputs)
    Path(_temp_beside(path)).unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = check_output_file(path)
    tmp = _temp_beside(path)
    umask = os.umask(0)  # mkstemp makes 0600 files; give the final file the usual permissions
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            os.replace(tmp_path, path)
        except OSError as e:
            raise _cannot(path, e) from None
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: str | os.PathLike | None = None) -> Iterator[Path]:
    """A working folder for intermediate files: `keep` when given (created if missing, left in place
    for the user to inspect), else a new temporary folder that is removed when the block ends, by
    return or by exception, so a run repeated every night does not fill the disk."""
    if keep is not None:
        folder = Path(keep)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet_atomic(df, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def read_toml(path: str | os.PathLike, what: str = "file") -> dict:
    """A TOML file as a dict; a missing or malformed file is a UserError naming `what` it is."""
    import tomllib

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a TOML {what}")
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
