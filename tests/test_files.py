"""files.atomic_write, the one way lorm_ext writes a file in place (Gram files, FCIL checkpoints and logs)."""

from __future__ import annotations

import os
import stat

import pytest

from lorm_ext import files


def test_atomic_write_replaces_the_file_durably_with_open_s_mode(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    files.atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # no temporary file left
    assert stat.S_IMODE(path.stat().st_mode) == files.default_mode(0o666)
    assert (False, path.stat().st_ino) in synced and (True, tmp_path.stat().st_ino) in synced
    assert synced.index((False, path.stat().st_ino)) < synced.index((True, tmp_path.stat().st_ino))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, write)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.bin"]

    def remove_then_fail(tmp):  # a writer that removed its temporary file before failing
        os.unlink(tmp)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # its own error, not the cleanup's
        files.atomic_write(tmp_path / "new.bin", remove_then_fail)
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
