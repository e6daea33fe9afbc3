#!/usr/bin/env bash
# A/B of a tmemfs image's small reads and large transfers: tmemfs as the venv runs it
# (main), tmemfs with PYTHONPATH=$BRANCH (this checkout with the fastpath pyfuse3 build
# first), and bench/barefs.py (bare pyfuse3, bytes in dicts), interleaved, one mount at
# a time. Each mount is fresh; its image is filled with 128 MiB of real file pages.
#   usage: bench/fastpath_ab.sh ROUNDS [OUT]     (as root; needs fio)
# Per variant: fio randread 32k and 4k (psync, one in flight, 3 s, over the 128 MiB),
# then dd 1 MiB O_DIRECT: 256 MiB written, 256 MiB read (MB/s).
# Environment: PY (default /work/main/.venv/bin/python), BRANCH (PYTHONPATH of the
# branch variant), DATA (a file of at least 256 MiB of real content; made from /usr/lib).
set -euo pipefail
rounds=${1:-3}; out=${2:-/dev/null}
PY=${PY:-/work/main/.venv/bin/python}
here=$(cd "$(dirname "$0")/.." && pwd)
BRANCH=${BRANCH:-$here/.build/pyfuse3-3.5.0/src:$here}
DATA=${DATA:-/tmp/usrlib-256M.bin}
[ -s "$DATA" ] || tar cf - -C /usr/lib . 2>/dev/null | head -c 268435456 > "$DATA"
mnt=$(mktemp -d /tmp/fastpath-ab.XXXX)
log=$mnt.log
start() {
    case $1 in
    main) (cd /tmp && env -u PYTHONPATH "$PY" -m tmemfs mount "$mnt" -f --max-pool 1G >"$log" 2>&1 &) ;;
    branch) (cd /tmp && PYTHONPATH=$BRANCH "$PY" -m tmemfs mount "$mnt" -f --max-pool 1G >"$log" 2>&1 &) ;;
    bare) (cd "$here" && env -u PYTHONPATH "$PY" -m bench.barefs "$mnt" --size 256 >"$log" 2>&1 &) ;;
    esac
    for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
    if [ "$1" = bare ]; then IMG=$mnt/img; else
        mkdir "$mnt/frontswap/0"; truncate -s 256M "$mnt/frontswap/0.img"; IMG=$mnt/frontswap/0.img
    fi
}
stop() {
    fusermount3 -u "$mnt"
    for _ in $(seq 100); do mountpoint -q "$mnt" || break; sleep 0.1; done
    sleep 0.5
}
randread() {  # BS -> IOPS
    fio --name=r --filename="$IMG" --rw=randread --bs="$1" --direct=1 --ioengine=psync \
        --runtime=3 --time_based --size=128m --output-format=json 2>/dev/null |
        "$PY" -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}
mbps() {  # dd ARGS... -> MB/s over 256 MiB
    local s e
    s=$(date +%s.%N); dd "$@" bs=1M count=256 status=none; e=$(date +%s.%N)
    "$PY" -c "print(round(256 * 1.048576 / ($e - $s)))"
}
for r in $(seq "$rounds"); do
    for v in main branch bare; do
        start "$v"
        dd if="$DATA" of="$IMG" bs=1M count=128 oflag=direct conv=notrunc status=none
        r32=$(randread 32k); r4=$(randread 4k)
        w=$(mbps if="$DATA" of="$IMG" oflag=direct conv=notrunc)
        rd=$(mbps if="$IMG" of=/dev/null iflag=direct)
        extra=""; [ "$v" = branch ] && extra=$(grep fastpath_requests "$mnt/.daemon" || true)
        echo "round $r $v randread32k_iops $r32 randread4k_iops $r4" \
             "write1M_MBps $w read1M_MBps $rd $extra" | tee -a "$out"
        stop
    done
done
rmdir "$mnt"; rm -f "$log"
