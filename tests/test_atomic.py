"""icegrid.atomic: files appear whole or not at all, private ones private from the first byte."""

import os
import stat

import pytest

from icegrid.atomic import atomic_path, write_atomic


def test_write_atomic_replaces_whole_and_leaves_nothing_aside(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    write_atomic(target, '{"new": 1}')
    assert target.read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_private_mode_holds_whatever_the_umask_and_over_a_wide_file(tmp_path):
    target = tmp_path / "key.pem"
    target.write_text("wide")
    os.chmod(target, 0o666)
    old = os.umask(0)
    try:
        write_atomic(target, b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == b"secret"


def test_a_failed_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
