"""Promotion: the challenger's bundle replaces the champion's, all three files or none.

A bundle is three files (serving graph, evaluation graph, item-map sidecar) that `load_bundle`
checks belong together; a half-replaced bundle is refused by the scorer, so a crash must never
leave one. Steps:
  1. copy the challenger's files beside the champion under temporary names, check them as a bundle;
  2. keep the current champion's files as `*.previous` (hard links or copies: the champion stays
     in place meanwhile);
  3. rename the new files over the champion's, sidecar first, serving graph last (as export does);
  4. if any rename fails, put every file back from `*.previous`, and re-raise.
The `*.previous` files are the previous champion (`m.onnx.previous`, `m.eval.onnx.previous`,
`m.items.parquet.previous`): rename them back to roll back.
A bundle with external weights (`<export id>.weights`) has its weights file copied beside the
champion under that same name before step 3 (no installed graph reads it yet); weights files
that no graph in the folder reads any more (the champion before the previous one) are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gru4rec.bundle import companion_paths, load_bundle, remove_unreferenced, weights_path
from gru4rec.errors import UserError

PREVIOUS = ".previous"


def bundle_files(onnx: Path) -> list[Path]:
    """The bundle's renamed files in install order: sidecar, evaluation graph, serving graph last."""
    eval_path, sidecar = companion_paths(onnx)
    return [sidecar, eval_path, Path(onnx)]


def copy_weights(onnx: Path, folder: Path) -> Path | None:
    """Copy `onnx`'s external weights file (if any) into `folder` under its own name; returns the
    copy when this call made it (None: no weights file, or one already there)."""
    src = weights_path(onnx)
    if src is None or (folder / src.name).is_file():
        return None
    dst = folder / src.name
    tmp = dst.with_name(f".{dst.name}.copy.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def copy_bundle(onnx: Path, to: Path) -> Path:
    """Copy the bundle of `onnx` to `to`'s paths (folder created), e.g. to seed a first champion; returns `to`."""
    to.parent.mkdir(parents=True, exist_ok=True)
    copy_weights(onnx, to.parent)
    for src, dst in zip(bundle_files(onnx), bundle_files(to), strict=True):
        shutil.copyfile(src, dst)
    return to


def promote_bundle(challenger: Path, champion: Path) -> dict:
    """Install `challenger`'s bundle at `champion`'s paths; returns what was done (for the report)."""
    load_bundle(challenger)  # never install a bundle that does not load
    sources, targets = bundle_files(challenger), bundle_files(champion)
    champion.parent.mkdir(parents=True, exist_ok=True)
    staged = [t.with_name(f".{t.name}.promote.tmp") for t in targets]
    kept: list[Path] = []
    old_previous = champion.with_name(champion.name + PREVIOUS)
    stale = weights_path(old_previous) if old_previous.is_file() else None  # about to be unreferenced
    new_weights = None
    try:
        new_weights = copy_weights(challenger, champion.parent)
        for src, tmp in zip(sources, staged, strict=True):
            shutil.copyfile(src, tmp)
        existed = champion.is_file()
        if existed:
            load_bundle(champion)  # the current champion must be a whole bundle to be kept
            for target in targets:
                previous = target.with_name(target.name + PREVIOUS)
                shutil.copy2(target, previous.with_name(previous.name + ".tmp"))
                os.replace(previous.with_name(previous.name + ".tmp"), previous)
                kept.append(previous)
        done: list[Path] = []
        try:
            for tmp, target in zip(staged, targets, strict=True):
                os.replace(tmp, target)
                done.append(target)
            load_bundle(champion)
        except BaseException:
            _roll_back(done, targets, existed)
            raise
    except BaseException as e:
        if new_weights is not None:
            new_weights.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(
                f"{champion}: promotion failed, champion left as it was ({e.strerror or e})"
            ) from None
        raise
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    if stale is not None:
        remove_unreferenced(stale)
    return {"champion": str(champion), "from": str(challenger), "previous": [str(p) for p in kept]}


def _roll_back(done: list[Path], targets: list[Path], existed: bool) -> None:
    """Put the previous champion back (or remove a half-installed first champion)."""
    for target in targets:
        if existed:
            previous = target.with_name(target.name + PREVIOUS)
            shutil.copy2(previous, target.with_name(f".{target.name}.rollback.tmp"))
            os.replace(target.with_name(f".{target.name}.rollback.tmp"), target)
        elif target in done:
            target.unlink(missing_ok=True)
