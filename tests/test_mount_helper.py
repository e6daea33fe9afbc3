"""mount_helpers/: `mount -t fuse.tmemfs` and fstab lines, through the real mount(8).

mount(8) only looks for helpers in /sbin, so the mount tests run in a private mount
namespace (unshare -m) where the helper's install directory is laid over /sbin with
a read-only overlay, and /run/mount (libmount's utab) is a private tmpfs: the test
installs nothing outside its temporary directory, and a failed test leaves no mount
behind on the host. The daemon writes its pid where the test can kill it if all else
fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "mount_helpers" / "install.sh"
HELPER_SOURCE = REPO / "mount_helpers" / "mount.fuse.tmemfs"
TMEMFS_COMMAND = Path(sys.executable).parent / "tmemfs"
MARKER = "# Installed by tmemfs mount_helpers/install.sh"


def install(
    directory: Path, *args: str, tmemfs: Path | str = TMEMFS_COMMAND, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMEMFS": str(tmemfs)}
    return subprocess.run(
        ["bash", str(INSTALL), "--dir", str(directory), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


@pytest.fixture(scope="module")
def helper_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with the helper installed by install.sh, as it would be in /sbin."""
    if not TMEMFS_COMMAND.exists():
        pytest.fail(f"no tmemfs command next to {sys.executable}: run examples/setup.sh")
    directory = tmp_path_factory.mktemp("sbin")
    install(directory)
    yield directory
    install(directory, "--uninstall")


def helper(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(directory / "mount.fuse.tmemfs"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- install.sh ---------------------------------------------------------------------------


def test_install_bakes_in_the_absolute_tmemfs_path(helper_dir: Path) -> None:
    installed = helper_dir / "mount.fuse.tmemfs"
    text = installed.read_text()
    assert os.access(installed, os.X_OK)
    assert MARKER in text
    assert f"TMEMFS='{TMEMFS_COMMAND}'" in text.splitlines()
    assert "@TMEMFS@'" not in text and "TMEMFS=@TMEMFS@" not in text
    # Installing again replaces its own file.
    assert "installed" in install(helper_dir).stdout


def test_uninstall_removes_only_its_own_file(tmp_path: Path) -> None:
    if not TMEMFS_COMMAND.exists():
        pytest.fail(f"no tmemfs command next to {sys.executable}: run examples/setup.sh")
    install(tmp_path)
    assert (tmp_path / "mount.fuse.tmemfs").exists()
    assert "removed" in install(tmp_path, "--uninstall").stdout
    assert not (tmp_path / "mount.fuse.tmemfs").exists()
    assert "not installed" in install(tmp_path, "--uninstall").stdout

    foreign = tmp_path / "mount.fuse.tmemfs"
    foreign.write_text("#!/bin/sh\n")
    for args in ((), ("--uninstall",)):
        result = install(tmp_path, *args, check=False)
        assert result.returncode == 1
        assert "not installed by" in result.stderr
    assert foreign.read_text() == "#!/bin/sh\n"


def test_install_refuses_a_command_that_is_not_tmemfs(tmp_path: Path) -> None:
    for bad in (tmp_path / "missing", "/bin/true"):
        result = install(tmp_path, tmemfs=bad, check=False)
        assert result.returncode == 1
        assert result.stderr.startswith("install.sh: ")
    assert not list(tmp_path.iterdir())


# -- option translation (-f: print the command, do not run it) -------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("backend=lz4,max_pool=25%", ["--backend", "lz4", "--max-pool", "25%"]),
        ("rw,nosuid,nodev,noexec,nofail,noauto,defaults,_netdev,user,x-systemd.automount", []),
        (
            "writeback=/var/tmp/tier,page_size=8192,reject_ratio=0.5,reject_poor,exclusive_gets,"
            "allow_other,namespace=ns1,remote_timeout=3,metrics=127.0.0.1:9477,log=/tmp/l,debug",
            [
                "--writeback",
                "/var/tmp/tier",
                "--page-size",
                "8192",
                "--reject-ratio",
                "0.5",
                "--reject-poor",
                "--exclusive-gets",
                "--allow-other",
                "--namespace",
                "ns1",
                "--remote-timeout",
                "3",
                "--metrics",
                "127.0.0.1:9477",
                "--log",
                "/tmp/l",
                "--debug",
            ],
        ),
        (
            'backend="redis+cluster://a:7000,b:7000",max-pool=1G',
            ["--backend", "redis+cluster://a:7000,b:7000", "--max-pool", "1G"],
        ),
    ],
)
def test_options_become_tmemfs_mount_options(
    helper_dir: Path, tmp_path: Path, options: str, expected: list[str]
) -> None:
    result = helper(helper_dir, "tmemfs", str(tmp_path), "-f", "-o", options)
    assert result.returncode == 0, result.stderr
    command = result.stderr.strip().removeprefix("mount.fuse.tmemfs: ").split(" ")
    assert command == [str(TMEMFS_COMMAND), "mount", *expected, "--", str(tmp_path)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("backend=lz4,bogus", "unknown option 'bogus'"),
        ("max_pool", "option 'max_pool' needs a value"),
        ("debug=1", "option 'debug' takes no value"),
        ("ro", "no read-only mode"),
    ],
)
def test_bad_options_are_one_line_and_exit_1(
    helper_dir: Path, tmp_path: Path, options: str, message: str
) -> None:
    result = helper(helper_dir, "tmemfs", str(tmp_path), "-o", options)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("mount.fuse.tmemfs: ")
    assert message in result.stderr


def test_sloppy_mount_ignores_unknown_options(helper_dir: Path, tmp_path: Path) -> None:
    result = helper(helper_dir, "tmemfs", str(tmp_path), "-s", "-f", "-o", "bogus,max_pool=8M")
    assert result.returncode == 0, result.stderr
    assert result.stderr.split()[-4:] == ["--max-pool", "8M", "--", str(tmp_path)]


def test_a_bad_value_is_tmemfs_own_one_line_error(helper_dir: Path, tmp_path: Path) -> None:
    result = helper(helper_dir, "tmemfs", str(tmp_path), "-o", "max_pool=lots")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "--max-pool" in result.stderr


# -- the real mount(8) and umount(8), in a private mount namespace ------------------------

# Runs as root in `unshare -m`: lays the helper directory over /sbin, runs the mount
# command given as arguments, stores and loads a page, unmounts with umount(8) and
# waits for the daemon to exit. Each step prints a line the test checks.
NAMESPACE_SCRIPT = textwrap.dedent(r"""
    set -euo pipefail
    mnt=$1 helpers=$2 pidfile=$3
    shift 3
    cleanup() {
        if mountpoint -q "$mnt"; then umount -l "$mnt" || true; fi
    }
    trap cleanup EXIT
    sbin=$(realpath /sbin)
    if [[ -d /run/mount ]]; then mount -t tmpfs tmpfs /run/mount; fi
    mount -t overlay overlay -o "lowerdir=$helpers:$sbin" "$sbin"
    echo "helper: $(command -v mount.fuse.tmemfs)"

    "$@"
    echo "mounted: $(findmnt -n -o FSTYPE,SOURCE --mountpoint "$mnt")"
    pid=$(sed -n 's/^pid //p' "$mnt/.daemon")
    echo "$pid" > "$pidfile"
    echo "max_pool: $(sed -n 's/^max_pool //p' "$mnt/.daemon")"
    echo "backend: $(sed -n 's/^backend //p' "$mnt/.daemon")"

    mkdir "$mnt/frontswap/0"
    head -c 4096 /usr/bin/bash > "$mnt.page"
    dd if="$mnt.page" of="$mnt/frontswap/0/7" bs=4096 status=none
    cmp "$mnt.page" "$mnt/frontswap/0/7" && echo "page: same"
    echo "stores: $(sed -n 's/^stores //p' "$mnt/stats")"

    umount "$mnt"
    echo "unmounted: $(findmnt -n --mountpoint "$mnt" || echo yes)"
    for _ in $(seq 200); do
        state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || true
        if [[ -z $state || $state == Z ]]; then break; fi
        sleep 0.05
    done
    if [[ -z $state || $state == Z ]]; then echo "daemon: exited"; else echo "daemon: alive"; fi
""")


def run_in_namespace(helpers: Path, mnt: Path, *command: str) -> dict[str, str]:
    """Run NAMESPACE_SCRIPT with `command` as the mount; its "key: value" lines."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mount(8), unshare -m and FUSE")
    for tool in ("unshare", "mount", "umount", "findmnt", "mountpoint"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            pytest.skip("no overlayfs to lay the helper over /sbin in a private namespace")
    mnt.mkdir()
    pidfile = mnt.parent / f"{mnt.name}.pid"
    try:
        result = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "bash",
                "-c",
                NAMESPACE_SCRIPT,
                "namespace-test",
                str(mnt),
                str(helpers),
                str(pidfile),
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        # Last resort: the daemon (only ours, by the pid it reported) must not outlive us.
        if pidfile.exists() and pidfile.read_text().strip().isdigit():
            pid = int(pidfile.read_text())
            state = Path(f"/proc/{pid}/stat")
            if state.exists() and "tmemfs" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, 9)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["helper"] == f"{os.path.realpath('/sbin')}/mount.fuse.tmemfs"
    assert lines["mounted"].split() == ["fuse.tmemfs", "tmemfs"]
    assert lines["page"] == "same"
    assert lines["stores"] == "1"
    assert lines["unmounted"] == "yes"
    assert lines["daemon"] == "exited", result.stderr
    return lines


def ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.mount
def test_mount_t_fuse_tmemfs(helper_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "tmem"
    lines = run_in_namespace(
        helper_dir,
        mnt,
        "mount",
        "-t",
        "fuse.tmemfs",
        "tmemfs",
        str(mnt),
        "-o",
        "backend=lz4,max_pool=25%",
    )
    assert lines["backend"] == "lz4"
    assert abs(int(lines["max_pool"]) - ram() // 4) <= 4096


@pytest.mark.mount
def test_fstab_line(helper_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "tmem"
    fstab = tmp_path / "fstab"
    # The README's line, at a temporary mount point; mount -T reads it instead of /etc/fstab.
    fstab.write_text(f"tmemfs {mnt} fuse.tmemfs backend=raw,max_pool=64M,nofail 0 0\n")
    lines = run_in_namespace(helper_dir, mnt, "mount", "-T", str(fstab), str(mnt))
    assert lines["backend"] == "raw"
    assert lines["max_pool"] == str(64 << 20)
