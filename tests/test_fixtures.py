"""The mount fixture itself: a test fails when its daemon logs an undeclared error.

As in pyfuse3's test/util.py, a daemon that logged an error, or exited non-zero,
fails the test that ran it, even if every assertion passed (issue 12, item 5).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import mounted

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

ERROR_RECORD = (
    "2026-12-02 10:00:00,000 ERROR tmemfs.fs: unexpected error in read\n"
    "Traceback (most recent call last):\n"
    '  File "fs.py", line 1, in read\n'
    "ZeroDivisionError: division by zero\n"
)


def append(log: Path, text: str) -> None:
    with open(log, "a") as f:
        f.write(text)


def test_undeclared_error_fails_the_test(tmp_path: Path) -> None:
    with (
        pytest.raises(pytest.fail.Exception, match="logged errors"),
        mounted(tmp_path / "mnt") as mount,
    ):
        append(mount.log, ERROR_RECORD)


def test_bare_traceback_fails_the_test(tmp_path: Path) -> None:
    with (
        pytest.raises(pytest.fail.Exception, match="logged errors"),
        mounted(tmp_path / "mnt") as mount,
    ):
        append(mount.log, "2026-12-02 10:00:00,000 INFO x: fine\n" + ERROR_RECORD.split("\n", 1)[1])


def test_declared_error_passes(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt") as mount:
        mount.expect_error(r"division by zero")
        append(mount.log, ERROR_RECORD)
        assert mount.unexpected_errors() == []


def test_clean_daemon_exits_zero(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt") as mount:
        (mount.path / "frontswap" / "0").mkdir()
    assert mount.proc.returncode == 0
    assert mount.unexpected_errors() == []
