#!/usr/bin/env bash
# Set up tmemfs on a Debian machine: system packages, a virtualenv in .venv, pyfuse3
# built from its sdist with patches/pyfuse3-3.5.0-fallocate.patch (discard support) and
# patches/pyfuse3-3.5.0-fastpath.patch (synchronous reads, writes, flushes and
# releases, and FOPEN_NOFLUSH; see the patch headers), and `pip install -e
# .[test,bench]`. Safe to run again; it installs only what is missing.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv liblz4-dev libzstd-dev rsync
          redis-server redis-tools fio util-linux kmod procps man-db)

run_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Undone on exit, in order.
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

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
        cleanup+=("run_root rm -f /usr/sbin/policy-rc.d")
    fi
    run_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    run_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || run_root modprobe fuse || true

cd "$here"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi

# pyfuse3 3.5.0 registers no fallocate handler, so the kernel never passes a discard
# on, and answers every request with a coroutine; we build it from the pinned sdist
# with our two patches, in this order. The build's local version label names the
# patches' checksum, so a build from other (older) patches is rebuilt.
pyfuse3_version=3.5.0
pyfuse3_sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
pyfuse3_patches=("$here/patches/pyfuse3-$pyfuse3_version-fallocate.patch"
                 "$here/patches/pyfuse3-$pyfuse3_version-fastpath.patch")
patches_sum=$(cat "${pyfuse3_patches[@]}" | sha256sum | cut -c1-8)
pyfuse3_label=$pyfuse3_version+fallocate.fastpath.$patches_sum
patched="import importlib.metadata as m, sys; sys.exit(m.version('pyfuse3') != '$pyfuse3_label')"
if ! .venv/bin/python -c "$patched" 2>/dev/null; then
    echo "setup: building pyfuse3 $pyfuse3_version with" \
        "$(for p in "${pyfuse3_patches[@]}"; do basename "$p"; done | paste -sd' ')"
    build=$(mktemp -d)
    cleanup+=("rm -rf '$build'")
    .venv/bin/python -m pip download -q --no-binary :all: --no-deps -d "$build" \
        "pyfuse3==$pyfuse3_version"
    sdist=$build/pyfuse3-$pyfuse3_version.tar.gz
    echo "$pyfuse3_sha256  $sdist" | sha256sum -c --quiet -
    tar -xzf "$sdist" -C "$build"
    for p in "${pyfuse3_patches[@]}"; do
        patch -d "$build/pyfuse3-$pyfuse3_version" -p1 -s < "$p"
    done
    # The local version label shows in `pip list`; it still satisfies pyfuse3==3.5.0.
    # pip's build environment brings Cython, which turns the patched .pyx into C.
    SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3="$pyfuse3_label" \
        .venv/bin/python -m pip install -q --force-reinstall --no-deps \
        "$build/pyfuse3-$pyfuse3_version"
fi

# Installing tmemfs after pyfuse3 keeps the patched build: it satisfies pyfuse3>=3.3,<4.
# (Run every time: an editable install also rebuilds what tmemfs itself compiles.)
.venv/bin/python -m pip install -q -e '.[test,bench]'
.venv/bin/python -c "$patched" ||
    { echo "setup: pyfuse3 was replaced by an unpatched build; run setup.sh again" >&2; exit 1; }
echo "setup: ready: $(.venv/bin/tmemfs --version)"
