"""`rediss://`: pages through a real TLS redis-server, and a certificate that is checked.

The server is Debian's redis-server with a CA and a server certificate for 127.0.0.1
made by openssl in the test's directory, listening with TLS only (`--port 0`), so a
page that reaches it went through TLS. A mount whose server cannot prove who it is (a
certificate from another CA, or for another host), or that speaks no TLS at all, is
one line on stderr and exit status 1: tmemfs never falls back to plaintext or to an
unchecked certificate.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import TMEMFS, Mount, is_mounted
from redis_servers import HOST, RedisFactory, make_tls
from tmemfs_testlib import PAGE, load, random_page, store, text_page

pytest_plugins = ["redis_servers"]  # the redis_factory fixture
pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MiB = 1 << 20


def refused_mount(tmp_path: Path, *args: str) -> str:
    """Run `tmemfs mount --foreground ARGS`; it must exit non-zero: its stderr."""
    mnt = tmp_path / "refused"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [*TMEMFS, "mount", "--foreground", *args, str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=30)
        proc.kill()
        proc.communicate()
        pytest.fail(f"tmemfs mounted with {args}")
    assert proc.returncode == 1, f"tmemfs exited {proc.returncode} with {args}: {stderr}"
    assert not is_mounted(mnt)
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, f"{args}: stderr is {stderr!r}"
    return stderr.strip()


def test_pages_and_the_image_go_through_tls(
    redis_factory: RedisFactory, mount_factory: object, tmp_path: Path
) -> None:
    server = redis_factory(tls=make_tls(tmp_path / "tls"))
    assert server.url.startswith("rediss://")
    mount: Mount = mount_factory("--backend", server.url)  # type: ignore[operator]
    pool = mount.path / "frontswap" / "0"
    pool.mkdir()
    pages = {i: (random_page(i) if i % 2 else text_page(i)) for i in range(64)}
    for i, page in pages.items():
        store(pool / str(i), page)
    for i, page in pages.items():
        assert load(pool / str(i)) == page, f"frontswap/0/{i} came back different over TLS"

    image = mount.path / "frontswap" / "1.img"
    subprocess.run(["truncate", "-s", str(4 * MiB), str(image)], check=True, timeout=30)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(4 * MiB))
    subprocess.run(
        [
            "dd",
            f"if={source}",
            f"of={image}",
            "bs=1M",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
        check=True,
        timeout=60,
    )
    copy = tmp_path / "copy"
    subprocess.run(
        ["dd", f"if={image}", f"of={copy}", "bs=1M", "iflag=direct", "status=none"],
        check=True,
        timeout=60,
    )
    assert copy.read_bytes() == source.read_bytes(), "the image came back different over TLS"

    # The server has no plaintext port: what it holds came over TLS.
    assert server.cli("config", "get", "port").split() == ["port", "0"]
    assert server.dbsize() > 0, "the TLS server holds nothing: where did the pages go?"
    assert mount.stats()["stored_pages"] == len(pages) + 4 * MiB // PAGE


@pytest.mark.parametrize("case", ["another CA", "the system's CAs", "another host"])
def test_an_untrusted_server_is_one_line_and_no_mount(
    redis_factory: RedisFactory, tmp_path: Path, case: str
) -> None:
    if case == "another host":
        # Signed by the CA the mount trusts, but issued to someone else.
        tls = make_tls(tmp_path / "tls", san="DNS:elsewhere.example")
    else:
        tls = make_tls(tmp_path / "tls")
    server = redis_factory(tls=tls)
    url = {
        "another CA": f"rediss://{server.address}/0?ssl_ca_certs={make_tls(tmp_path / 'x').ca}",
        "the system's CAs": f"rediss://{server.address}/0",
        "another host": server.url,
    }[case]
    line = refused_mount(tmp_path, "--backend", url, "--remote-timeout", "2")
    assert "certificate is not trusted" in line, line
    assert server.dbsize() == 0


def test_rediss_to_a_plaintext_server_is_refused(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """No fallback: a server that speaks no TLS is not used in the clear."""
    server = redis_factory()
    line = refused_mount(
        tmp_path, "--backend", f"rediss://{server.address}/0", "--remote-timeout", "2"
    )
    assert "cannot reach" in line, line
    assert server.dbsize() == 0


@pytest.mark.parametrize(
    "query, says",
    [
        ("ssl_ca_cert={ca}", "unknown parameter 'ssl_ca_cert'"),
        ("ssl_ca_certs=/nonexistent/ca.pem", "does not exist"),
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("ssl_cert_reqs=none&ssl_check_hostname=true", "ssl_check_hostname=true needs"),
    ],
)
def test_bad_tls_parameters_are_one_line(tmp_path: Path, query: str, says: str) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    line = refused_mount(tmp_path, "--backend", f"rediss://{HOST}:6390/0?{query.format(ca=ca)}")
    assert says in line, line


def test_tls_parameters_need_rediss(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    line = refused_mount(tmp_path, "--backend", f"redis://{HOST}:6390/0?ssl_ca_certs={ca}")
    assert "needs a rediss:// URL" in line, line
