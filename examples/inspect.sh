#!/usr/bin/env bash
# inspect.sh - look at tmemfs with the shell tools you already know.
#
# Mounts tmemfs on a temporary directory (or uses --mount DIR), makes a frontswap
# pool and a cleancache pool, stores pages with dd (text, a zero page, random
# bytes, a duplicate), and shows what ls, du, cat and `tmemfs stat` say about
# them; then invalidates a page, flushes the pools and unmounts. Every command is
# printed before it runs, as in a terminal session. Run as root.
#
# Exit status: 0 done, 1 a step failed, 2 usage error, 77 cannot run here (not
# root, no /dev/fuse).

set -euo pipefail

PROG=${0##*/}
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname -- "$HERE")

usage() {
    cat <<EOF
Usage: $PROG [--mount DIR] [--pool N]

  --mount DIR   use the tmemfs mounted on DIR (left mounted; only the pools this
                script makes are removed); default: mount one on a temporary
                directory, with --max-pool 64M
  --pool N      the frontswap pool to use (default 0; it must not exist yet)

Environment: TMEMFS, the tmemfs command (default: .venv/bin/tmemfs of this
clone, else tmemfs on PATH).
EOF
}

MOUNT=""
POOL=0
while (($#)); do
    case $1 in
        --mount) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; MOUNT=$2; shift 2 ;;
        --pool) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; POOL=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
[[ $POOL =~ ^(0|[1-9][0-9]*)$ ]] || { echo "$PROG: --pool takes a decimal number" >&2; exit 2; }

if [[ -n ${TMEMFS:-} ]]; then
    read -ra TMEMFS_CMD <<<"$TMEMFS"
elif [[ -x $ROOT/.venv/bin/tmemfs ]]; then
    TMEMFS_CMD=("$ROOT/.venv/bin/tmemfs")
else
    TMEMFS_CMD=(tmemfs)
fi
tmemfs() { "${TMEMFS_CMD[@]}" "$@"; }

if ((EUID != 0)); then echo "$PROG: SKIP: run as root" >&2; exit 77; fi
if [[ ! -e /dev/fuse ]]; then echo "$PROG: SKIP: no /dev/fuse" >&2; exit 77; fi

# Show a command as typed at a root prompt, then run it in the mount (as a shell
# would: a producer cut short by SIGPIPE, as seq is by dd, is no failure).
show() {
    if (($# > 1)); then printf '# %-58s # %s\n' "$1" "$2"; else printf '# %s\n' "$1"; fi
    (cd "$MNT" && set +o pipefail && eval "$1")
}

TMPD=""
MOUNTED=0
MADE=()
cleanup() {
    local status=$?
    trap '' INT TERM HUP
    cd /
    for dir in "${MADE[@]}"; do
        [[ -d $MNT/$dir ]] && rmdir "$MNT/$dir"
    done
    if ((MOUNTED)); then tmemfs umount "$MNT" || status=1; fi
    if [[ -n $TMPD ]]; then rm -rf -- "$TMPD"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n $MOUNT ]]; then
    MNT=$(cd -- "$MOUNT" && pwd)
    [[ -f $MNT/stats && -d $MNT/frontswap ]] || { echo "$PROG: $MNT is not a tmemfs" >&2; exit 1; }
else
    TMPD=$(mktemp -d "${TMPDIR:-/tmp}/tmemfs-inspect.XXXXXX")
    MNT=$TMPD/mnt
    mkdir "$MNT"
    echo "# tmemfs mount --max-pool 64M $MNT"
    tmemfs mount --max-pool 64M "$MNT"
    MOUNTED=1
fi
[[ ! -e $MNT/frontswap/$POOL ]] || { echo "$PROG: frontswap/$POOL exists; use --pool" >&2; exit 1; }
[[ ! -e $MNT/cleancache/inspect-demo ]] || { echo "$PROG: cleancache/inspect-demo exists" >&2; exit 1; }
P=$(sed -n 's/^page_size //p' "$MNT/stats")
S=frontswap/$POOL

echo
echo "## A frontswap pool: mkdir is frontswap init, each file is one page"
MADE+=("$S")
show "ls"
show "mkdir $S"
show "seq 100000 | dd of=$S/0 bs=$P count=1 iflag=fullblock status=none" "text: compresses"
show "dd if=/dev/zero of=$S/1 bs=$P count=1 status=none" "same-filled: free"
show "dd if=/dev/urandom of=$S/2 bs=$P count=1 status=none" "random: stored raw"
show "dd if=$S/0 of=$S/3 bs=$P status=none" "a duplicate of page 0"
show "for i in 10 11 12 13; do dd if=/usr/bin/bash of=$S/\$i bs=$P skip=\$i count=1 status=none; done"
show "ls $S | wc -l" "pages stored"
show "ls -ls $S" "blocks: what each page costs"
show "du -b $S" "what the pool costs"
show "cmp <(seq 100000 | head -c $P) $S/0 && echo 'page 0 reads back'"

echo
echo "## A cleancache pool: pages may vanish, a miss is ENOENT"
MADE=("cleancache/inspect-demo" "${MADE[@]}")
show "mkdir -p cleancache/inspect-demo/inode42" "init_fs and an object"
show "echo hello > cleancache/inspect-demo/inode42/0" "put (zero-padded to a page)"
show "head -c 5 cleancache/inspect-demo/inode42/0; echo"
show "cat cleancache/inspect-demo/inode42/1 2>&1 || true" "a miss: ENOENT"

echo
echo "## Counters"
show "cat $S/.stats"
show "cat stats"
printf '# tmemfs stat %s\n' "$MNT"
tmemfs stat "$MNT"

echo
echo "## Invalidate and flush"
show "rm $S/2" "invalidate_page"
show "ls $S | wc -l"
show "rmdir cleancache/inspect-demo/inode42" "invalidate_inode"
show "rmdir cleancache/inspect-demo $S" "invalidate_fs, invalidate_area"
show "ls frontswap cleancache"
MADE=()
if ((MOUNTED)); then
    echo
    echo "# tmemfs umount $MNT"
    tmemfs umount "$MNT"
    MOUNTED=0
fi
echo "$PROG: done"
