"""Every file the package writes goes through ``runtime.atomic.atomic_write``: whole or not at all, with plain
permissions."""
import os
import stat

import pytest

from runtime.atomic import atomic_write, atomic_write_text, stale_temporaries


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "config.json", "old")

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert atomic_write_text(path, "new") == path and path.read_text() == "new"


def test_files_get_the_permissions_open_would_give_them(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "sub" / "metrics.jsonl", "{}\n")  # the folder is made too
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640


def test_temporaries_of_a_killed_writer_are_found_for_the_checkpoint_to_clear(tmp_path):
    (tmp_path / ".model.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"half")
    assert [p.name for p in stale_temporaries(tmp_path / "model.pt")] == [".model.pt.abc123.tmp"]
