"""Who may use what: mode bits and owners on a shared mount, and secrets kept out of `ps`.

With --allow-other the kernel checks mode bits (default_permissions); pools and
objects belong to whoever made them, with mkdir's mode minus the umask, and pages
show the pool's owner and its mode without the x bits. frontswap/ and cleancache/
are 1777 like /tmp: any user may make a pool there, and only its owner (or root)
may remove it. Other users are played by `setpriv` as nobody (65534) and as
daemon (1), in a child Python that reports the errno of each step.

The log, `.daemon`, stats and error messages are checked for Redis passwords by
tests/test_operators.py::test_secrets_never_reach_logs_or_stats, `ps` included.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, mounted
from tmemfs_testlib import PAGE, load, page_names, store, text_page

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

TMEMFS = [sys.executable, "-m", "tmemfs"]
NOBODY = 65534
OTHER = 1  # "daemon": a second unprivileged user, neither root nor nobody

# Run in the child as another user: each step is a line of Python whose errno (or 0)
# is reported, so one child answers many questions.
_CHILD = r"""
import json, os, sys
results = {}
for name, code in json.loads(sys.argv[1]):
    try:
        value = eval(code)
        results[name] = [0, value if isinstance(value, (int, str, list)) else None]
    except OSError as exc:
        results[name] = [exc.errno, None]
print(json.dumps(results))
"""


def as_user(uid: int, steps: dict[str, str], umask: int = 0o022) -> dict[str, int]:
    """Run each step (a Python expression) as uid:uid without groups; name -> errno."""
    return {name: err for name, (err, _) in as_user_values(uid, steps, umask).items()}


def as_user_values(
    uid: int, steps: dict[str, str], umask: int = 0o022
) -> dict[str, tuple[int, object]]:
    """Like as_user, with the value each successful step returned."""
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            sys.executable,
            "-c",
            f"import os; os.umask({umask}); exec({_CHILD!r})",
            json.dumps(list(steps.items())),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    return {name: (err, value) for name, (err, value) in json.loads(result.stdout).items()}


@pytest.fixture
def shared_mount(shared_dir: Path) -> Iterator[Mount]:
    """A --allow-other mount that other users can reach."""
    with mounted(shared_dir / "mnt", "--allow-other") as mount:
        yield mount


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_others_cannot_touch_a_0700_pool_of_roots(shared_mount: Mount) -> None:
    pool = shared_mount.path / "frontswap" / "0"
    old = os.umask(0o022)
    try:
        pool.mkdir(mode=0o700)
    finally:
        os.umask(old)
    store(pool / "1", text_page(1))
    st = os.stat(pool)
    assert (st.st_uid, st.st_gid, mode_of(pool)) == (0, 0, 0o700)
    page = os.stat(pool / "1")
    assert (page.st_uid, page.st_gid, mode_of(pool / "1")) == (0, 0, 0o600)

    seen = as_user(
        NOBODY,
        {
            "list": f"os.listdir({str(pool)!r})",
            "read": f"open({str(pool / '1')!r}, 'rb').read()",
            "write": f"open({str(pool / '2')!r}, 'wb').write(b'x')",
            "overwrite": f"open({str(pool / '1')!r}, 'r+b').write(b'x')",
            "unlink": f"os.unlink({str(pool / '1')!r})",
            "rmdir": f"os.rmdir({str(pool)!r})",
            "chmod": f"os.chmod({str(pool)!r}, 0o777)",
            "stats": f"open({str(pool / '.stats')!r}).read()",
        },
    )
    assert seen == {
        "list": errno.EACCES,
        "read": errno.EACCES,
        "write": errno.EACCES,
        "overwrite": errno.EACCES,
        "unlink": errno.EACCES,
        # frontswap/ is sticky (1777): only the owner of a pool (or root) removes it.
        "rmdir": errno.EPERM,
        "chmod": errno.EPERM,
        "stats": errno.EACCES,
    }
    # Nothing of it changed: the page and the pool are still root's and intact.
    assert load(pool / "1") == text_page(1)
    assert page_names(pool) == {"1"}


def test_a_user_makes_and_uses_a_pool_of_their_own(shared_mount: Mount) -> None:
    fs = shared_mount.path / "frontswap"
    assert mode_of(fs) == 0o1777 and mode_of(shared_mount.path / "cleancache") == 0o1777
    pool, obj = fs / "5", shared_mount.path / "cleancache" / "mine" / "inode7"
    page = text_page(5)
    seen = as_user_values(
        NOBODY,
        {
            "mkdir": f"os.mkdir({str(pool)!r}, 0o750)",
            "store": f"open({str(pool / '3')!r}, 'wb', buffering=0).write({page!r})",
            "load": f"len(open({str(pool / '3')!r}, 'rb', buffering=0).read())",
            "list": f"sorted(n for n in os.listdir({str(pool)!r}) if n[0] != '.')",
            "mkdir_cc": f"os.mkdir({str(obj.parent)!r})",
            "mkdir_obj": f"os.mkdir({str(obj)!r}, 0o700)",
            "put": f"open({str(obj / '0')!r}, 'wb', buffering=0).write({page!r})",
            "chown_to_root": f"os.chown({str(pool)!r}, 0, 0)",
            "chmod_page": f"os.chmod({str(pool / '3')!r}, 0o600)",
        },
        umask=0o027,
    )
    assert seen == {
        "mkdir": (0, None),
        "store": (0, PAGE),
        "load": (0, PAGE),
        "list": (0, ["3"]),
        "mkdir_cc": (0, None),
        "mkdir_obj": (0, None),
        "put": (0, PAGE),
        "chown_to_root": (errno.EPERM, None),  # only root may chown
        "chmod_page": (errno.EPERM, None),  # pages follow their pool, never chmod
    }
    # The pool is nobody's with mkdir's mode minus the umask; pages follow the pool.
    st = os.stat(pool)
    assert (st.st_uid, st.st_gid, mode_of(pool)) == (NOBODY, NOBODY, 0o750)
    pst = os.stat(pool / "3")
    assert (pst.st_uid, pst.st_gid, mode_of(pool / "3")) == (NOBODY, NOBODY, 0o640)
    assert (os.stat(obj).st_uid, mode_of(obj)) == (NOBODY, 0o700)
    assert (os.stat(obj.parent).st_uid, mode_of(obj.parent)) == (NOBODY, 0o750)
    assert load(pool / "3") == page  # root reads everything

    # A third user is kept out by the mode bits; the owner may open it up with chmod,
    # and the pages follow the pool's new mode.
    assert as_user(OTHER, {"read": f"open({str(pool / '3')!r}, 'rb').read()"}) == {
        "read": errno.EACCES
    }
    assert as_user(NOBODY, {"chmod": f"os.chmod({str(pool)!r}, 0o755)"}) == {"chmod": 0}
    assert mode_of(pool / "3") == 0o644
    assert as_user(
        OTHER,
        {
            "read": f"len(open({str(pool / '3')!r}, 'rb', buffering=0).read())",
            "write": f"open({str(pool / '4')!r}, 'wb').write(b'x')",
            "rmdir": f"os.rmdir({str(pool)!r})",
        },
    ) == {"read": 0, "write": errno.EACCES, "rmdir": errno.EPERM}

    # root may chown; the pages follow, and the old owner lost the pool.
    os.chown(pool, OTHER, OTHER)
    assert (os.stat(pool / "3").st_uid, os.stat(pool / "3").st_gid) == (OTHER, OTHER)
    assert as_user(NOBODY, {"chmod": f"os.chmod({str(pool)!r}, 0o777)"}) == {"chmod": errno.EPERM}
    # Even root may not chmod or chown a page.
    for action in (lambda: os.chmod(pool / "3", 0o666), lambda: os.chown(pool / "3", 0, 0)):
        with pytest.raises(PermissionError) as info:
            action()
        assert info.value.errno == errno.EPERM
    # The owner removes their own pool (rmdir = flush, even when not empty).
    assert as_user(OTHER, {"rmdir": f"os.rmdir({str(pool)!r})"}) == {"rmdir": 0}
    assert not pool.exists()


def test_without_allow_other_other_users_get_eacces(shared_dir: Path) -> None:
    with mounted(shared_dir / "mnt") as mount:
        (mount.path / "frontswap" / "0").mkdir(mode=0o777)
        seen = as_user(
            NOBODY,
            {
                "stat": f"os.stat({str(mount.path)!r})",
                "list": f"os.listdir({str(mount.path)!r})",
                "stats": f"open({str(mount.path / 'stats')!r}).read()",
                "store": f"open({str(mount.path / 'frontswap' / '0' / '1')!r}, 'wb').write(b'x')",
            },
        )
        assert seen == dict.fromkeys(seen, errno.EACCES)
        assert page_names(mount.path / "frontswap" / "0") == set()
