#!/usr/bin/env bash
# Set up tmemfs on a Debian machine: system packages, a virtualenv in .venv, and
# `pip install -e .[test,bench]`. Safe to run again; it installs only what is missing.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv liblz4-dev libzstd-dev
          redis-server redis-tools fio util-linux kmod procps man-db)

run_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Install services without starting them: the tests start their own redis-server
    # on ports of their own, and no other server should be left running.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        run_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
        trap 'run_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    run_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    run_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || run_root modprobe fuse || true

cd "$here"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "setup: ready ($(.venv/bin/tmemfs --version))"
