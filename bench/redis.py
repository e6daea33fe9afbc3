"""Pages through a tmemfs on Redis, against redis-benchmark on the same server.

    python -m bench.redis [--corpus-mib 256] [--requests 200000]

Starts its own redis-server on 127.0.0.1 (no persistence), mounts tmemfs with
`--backend redis://...` (root needed), and writes then reads the first
--corpus-mib MiB of /usr/lib (whole pages) through frontswap/0.img with 1 MiB
O_DIRECT requests, as a loop device would: the batched path. Then runs
`redis-benchmark -P 32 -d 4096 -t set,get` against the same server and prints
tmemfs pages/s, redis-benchmark requests/s and their ratio. Everything it started
is unmounted and stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.directio import CHUNK, aligned, direct_read, direct_write
from bench.pagefiles import PAGE, stats, usr_lib_pages

TMEMFS = [sys.executable, "-m", "tmemfs"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """redis-server in the foreground, bound to 127.0.0.1, answering PING."""
    log = open(directory / "redis.log", "wb")  # noqa: SIM115 - the server keeps it
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            "",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise SystemExit(
                f"redis-server exited with {proc.returncode}: "
                f"{(directory / 'redis.log').read_text()[-2000:]}"
            )
        ping = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
        )
        if ping.stdout.strip() == "PONG":
            return proc
        if time.monotonic() > deadline:
            stop_redis(proc)
            raise SystemExit("redis-server did not answer PING in 20 s")
        time.sleep(0.05)


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def redis_benchmark(port: int, requests: int) -> dict[str, float]:
    """requests/s of SET and GET, 4 KiB values, 32 commands per pipeline."""
    result = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-P",
            "32",
            "-d",
            "4096",
            "-t",
            "set,get",
            "-n",
            str(requests),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rates: dict[str, float] = {}
    # With -q each test ends in a line like "SET: 512820.53 requests per second, p50=..."
    # (earlier progress lines are separated by carriage returns).
    for line in re.split(r"[\r\n]+", result.stdout):
        match = re.match(r"\s*(SET|GET):\s*([\d.]+) requests per second", line)
        if match:
            rates[match.group(1)] = float(match.group(2))
    if set(rates) != {"SET", "GET"}:
        raise SystemExit(f"cannot read redis-benchmark's output:\n{result.stdout}")
    return rates


def used_memory(port: int) -> int:
    info = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "memory"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"^used_memory:(\d+)", info, re.MULTILINE)
    return int(match.group(1)) if match else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mib", type=int, default=256)
    parser.add_argument("--requests", type=int, default=200000)
    args = parser.parse_args()

    corpus_pages = list(usr_lib_pages(args.corpus_mib << 20))
    size = len(corpus_pages) * PAGE // CHUNK * CHUNK  # whole 1 MiB requests
    if size == 0:
        raise SystemExit("no corpus: /usr/lib has less than 1 MiB of files")
    corpus = aligned(size)
    for i in range(size // PAGE):
        corpus[i * PAGE : (i + 1) * PAGE] = corpus_pages[i]
    del corpus_pages
    back = aligned(size)
    pages = size // PAGE

    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        port = free_port()
        server = start_redis(Path(tmp), port)
        try:
            subprocess.run(
                [*TMEMFS, "mount", "--backend", f"redis://127.0.0.1:{port}/0", str(mnt)], check=True
            )
            image = mnt / "frontswap" / "0.img"
            subprocess.run(["truncate", "-s", str(size), str(image)], check=True)
            t_store = direct_write(image, corpus, size)
            t_load = direct_read(image, back, size)
            if back[:] != corpus[:]:
                raise SystemExit("the image came back different from what was written")
            s = stats(mnt)
            memory = used_memory(port)
            rates = redis_benchmark(port, args.requests)
        finally:
            if os.path.ismount(mnt):
                subprocess.run([*TMEMFS, "umount", str(mnt)], check=False)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            stop_redis(server)
            corpus.close()
            back.close()

    store_rate, load_rate = pages / t_store, pages / t_load
    print(
        f"tmemfs --backend redis:// : {size >> 20} MiB of /usr/lib ({pages} pages) "
        f"through frontswap/0.img, 1 MiB O_DIRECT requests"
    )
    print(f"  store {store_rate:10.0f} pages/s  ({size / t_store / (1 << 20):7.1f} MiB/s)")
    print(f"  load  {load_rate:10.0f} pages/s  ({size / t_load / (1 << 20):7.1f} MiB/s)")
    print(
        f"  stores {s.get('stores', 0)}  loads {s.get('loads', 0)}  "
        f"Redis used_memory {memory >> 20} MiB"
    )
    print(f"redis-benchmark -P 32 -d 4096 -n {args.requests} on the same server:")
    print(f"  SET   {rates['SET']:10.0f} requests/s")
    print(f"  GET   {rates['GET']:10.0f} requests/s")
    print("ratio (tmemfs pages/s / redis-benchmark requests/s):")
    print(f"  store / SET  {store_rate / rates['SET']:.3f}")
    print(f"  load  / GET  {load_rate / rates['GET']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
