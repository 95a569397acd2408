"""Atomic writes and up-front output checks (gru4rec.io)."""

import pytest

from gru4rec.errors import UserError
from gru4rec.io import atomic_path, check_output_file, scratch_dir, write_text_atomic


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path):
    target = tmp_path / "a" / "b.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.txt"]  # no temp file left


def test_writes_through_a_symlink(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d, "directory"),
        (lambda d: (d / "f").write_text("x") and d / "f" / "out.json", "existing file"),
        (lambda d: "/proc/gru4rec-no-such-dir/out.json", "cannot write"),  # fails for root too
        (lambda d: "/dev/null", "not a regular file"),
    ],
)
def test_unusable_outputs_are_user_errors(tmp_path, make, needle):
    with pytest.raises(UserError, match=needle):
        write_text_atomic(make(tmp_path), "x")


def test_output_may_not_overwrite_an_input(tmp_path):
    inp = tmp_path / "in.parquet"
    inp.write_text("data")
    with pytest.raises(UserError, match="overwrite an input"):
        check_output_file(tmp_path / "." / "in.parquet", inputs=(inp,))
    assert check_output_file(tmp_path / "out.parquet", inputs=(inp,)) == tmp_path / "out.parquet"


def test_scratch_dir_is_removed_on_return_and_on_error_and_kept_when_named(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with scratch_dir("gru4rec-x-") as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "f.bin").write_bytes(b"x" * 100)
        assert folder.parent == tmp_path and folder.name.startswith("gru4rec-x-")
    with pytest.raises(RuntimeError), scratch_dir("gru4rec-y-") as folder:
        (folder / "f").write_text("half")
        raise RuntimeError("crash mid-run")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "work" / "n1"
    with scratch_dir("gru4rec-z-", kept) as folder:
        (folder / "f").write_text("keep")
    assert folder == kept and (kept / "f").read_text() == "keep"  # the user asked to inspect it
