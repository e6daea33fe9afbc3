#!/usr/bin/env bash
# swap-on-loop.sh - swap on a tmemfs block image, under real memory pressure.
#
# Mounts tmemfs (or uses --mount DIR), and `tmemfs swap on` makes the next free
# MOUNT/frontswap/N.img, attaches it with `losetup --direct-io=on`, runs mkswap and
# `swapon --discard -p 32767`; then it runs
# swap_workload.py in a memory cgroup of its own whose limit is well below the
# workload's working set, so the kernel really swaps through the loop device
# into tmemfs. Prints a progress line per second and a summary, and always
# undoes what it did (`tmemfs swap off`, cgroup, unmount), even when
# interrupted. Needs root. See --help.
#
# Exit status: 0 PASS, 1 FAIL, 2 usage error, 77 cannot run here (not root, no
# loop devices, no swap, no memory cgroup), 124 workload timed out,
# 129/130/143 interrupted (HUP/INT/TERM).

set -euo pipefail

PROG=${0##*/}
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname -- "$HERE")
WORKLOAD=$HERE/swap_workload.py

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS]

Swap on a tmemfs block image and run a memory-hungry, self-checking workload in
a memory cgroup whose limit is well below its working set, so that the kernel
swaps pages out to tmemfs and back in. Run as root.

Options:
  --mount DIR         use the tmemfs already mounted on DIR (never unmounted);
                      default: mount a new one on a temporary directory
  --image-size SIZE   size of the swap image MOUNT/frontswap/N.img (default 1G)
  --limit SIZE        memory limit of the workload's cgroup (default 256M)
  --working-set SIZE  memory the workload fills and checks (default 768M)
  --backend B         backend for a new mount (tmemfs mount --backend)
  --max-pool SIZE     budget for a new mount (tmemfs mount --max-pool; e.g. 1G, 25%)
  --recompress-after SECS
                      recompress pages idle this long with zstd, on a new mount
                      (tmemfs mount --recompress-after; the default, 60, is longer
                      than most runs here)
  --timeout SECS      stop the workload after SECS seconds, 0 = never (default 1800)
  --no-discard        swapon without --discard: freed slots stay stored
  --page-cluster N    vm.page-cluster (swap readahead of 2^N pages) for the run,
                      restored after; "keep" leaves it (default 5: FUSE costs more
                      per request than per byte, see BENCHMARKS.md)
  -h, --help          show this help

SIZE takes K, M, G, T suffixes (powers of 1024).

Environment:
  TMEMFS   command that runs tmemfs (default: ../.venv/bin/tmemfs next to this
           script, else tmemfs on PATH, else python3 -m tmemfs)
  PYTHON   interpreter for the workload (default python3; stdlib only)

The cgroup is cgroup v2 (memory.max; memory.swap.max left unlimited) where the
v2 hierarchy has the memory controller, else cgroup v1 (memory.limit_in_bytes,
memory.swappiness=100). Only the workload process is moved into it.

Exit status: 0 PASS, 1 FAIL, 2 usage error, 77 cannot run here (not root,
no loop device, no swap support, no memory cgroup), 124 timed out,
130/143 interrupted. Swap is used with --discard, so slots that swap frees are
invalidated in tmemfs (tmemfs(5), Discard; needs the patched pyfuse3 of setup.sh).
Twice a second it samples the pool's stored_pages against the swap in use; the
summary gives their ratio (average and peak) and what stays stored after exit,
and, with the lz4 backend, the most pages held in zstd at any sample and the loads
that met one (what background recompression did during the run, and cost).
EOF
}

say()  { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die()  { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
skip() { printf '%s: SKIP: %s\n' "$PROG" "$*" >&2; exit 77; }
usage_error() { printf '%s: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }

# SIZE with optional K/M/G/T (and iB/B) suffix -> bytes.
to_bytes() {
    local s=${1%[bB]}
    s=${s%[iI]}
    [[ $s =~ ^[0-9]+(\.[0-9]+)?[KkMmGgTt]?$ ]] || return 1
    s=${s^^}
    numfmt --from=iec -- "$s"
}
mib() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }

# ---------------------------------------------------------------- options
MOUNT=""
IMAGE_SIZE=1G
LIMIT=256M
WORKING_SET=768M
POOL=""            # the image number tmemfs swap on took
BACKEND=""
MAX_POOL=""
RECOMPRESS_AFTER=""
TIMEOUT=1800
DISCARD=1
PAGE_CLUSTER=5
SAVED_PAGE_CLUSTER=""  # the value to put back at exit

need_arg() { [[ $# -ge 2 && -n $2 ]] || usage_error "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
    opt=$1
    if [[ $opt == --*=* ]]; then
        set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
        opt=$1
    fi
    case $opt in
        --mount)        need_arg "$@"; MOUNT=$2; shift 2 ;;
        --image-size)   need_arg "$@"; IMAGE_SIZE=$2; shift 2 ;;
        --limit)        need_arg "$@"; LIMIT=$2; shift 2 ;;
        --working-set)  need_arg "$@"; WORKING_SET=$2; shift 2 ;;
        --backend)      need_arg "$@"; BACKEND=$2; shift 2 ;;
        --max-pool)     need_arg "$@"; MAX_POOL=$2; shift 2 ;;
        --recompress-after) need_arg "$@"; RECOMPRESS_AFTER=$2; shift 2 ;;
        --timeout)      need_arg "$@"; TIMEOUT=$2; shift 2 ;;
        --no-discard)   DISCARD=0; shift ;;
        --page-cluster) need_arg "$@"; PAGE_CLUSTER=$2; shift 2 ;;
        -h|--help)      usage; exit 0 ;;
        *)              usage_error "unknown argument: $opt" ;;
    esac
done

IMAGE_BYTES=$(to_bytes "$IMAGE_SIZE") || usage_error "bad --image-size: $IMAGE_SIZE"
LIMIT_BYTES=$(to_bytes "$LIMIT") || usage_error "bad --limit: $LIMIT"
WS_BYTES=$(to_bytes "$WORKING_SET") || usage_error "bad --working-set: $WORKING_SET"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || usage_error "bad --timeout: $TIMEOUT (seconds)"
PAGE=$(getconf PAGESIZE)
(( IMAGE_BYTES >= 16 * PAGE )) || usage_error "--image-size is too small for mkswap"
(( LIMIT_BYTES >= 8 * 1048576 )) || usage_error "--limit below 8M leaves no room for python"
(( WS_BYTES > 0 )) || usage_error "--working-set must be positive"
if [[ -n $MOUNT ]] && [[ -n $BACKEND || -n $MAX_POOL || -n $RECOMPRESS_AFTER ]]; then
    warn "--backend, --max-pool and --recompress-after only apply to a new mount; ignored with --mount"
fi
if (( LIMIT_BYTES >= WS_BYTES )); then
    warn "--limit ($LIMIT) is not below --working-set ($WORKING_SET): the kernel may not swap at all"
fi
if (( IMAGE_BYTES < WS_BYTES - LIMIT_BYTES + 64 * 1048576 )); then
    warn "--image-size ($IMAGE_SIZE) is small for working set - limit; the workload may be OOM-killed"
fi

# ---------------------------------------------------------------- can we run here?
(( EUID == 0 )) || skip "must run as root (losetup, swapon and cgroups need it)"
for cmd in losetup mkswap swapon swapoff truncate timeout numfmt awk; do
    command -v "$cmd" >/dev/null 2>&1 || skip "command not found: $cmd"
done
[[ -r /proc/swaps ]] || skip "this kernel has no swap support (/proc/swaps missing)"
losetup -f >/dev/null 2>&1 || skip "no free loop device (is the loop module loaded? try: modprobe loop)"
[[ -f $WORKLOAD ]] || die "workload not found: $WORKLOAD"
read -ra PY <<<"${PYTHON:-python3}"
command -v "${PY[0]}" >/dev/null 2>&1 || skip "python not found: ${PY[0]} (set PYTHON=...)"
# May this process swapon at all? Asked before anything is mounted, so that a refusal
# later is tmemfs's doing (a FAIL), never a SKIP: swapon(2) of /dev/null is EPERM
# where it is not permitted (no CAP_SYS_ADMIN, a seccomp filter), else EINVAL.
swapon_errno=$("${PY[@]}" -c 'import ctypes; c = ctypes.CDLL(None, use_errno=True)
c.swapon(b"/dev/null", 0); print(ctypes.get_errno())')
[[ $swapon_errno == 1 ]] && skip "swapon is not permitted here (EPERM)"

# Which memory cgroup: v2 if its hierarchy has the memory controller, else v1.
CG_VERSION=""
CG_PARENT=""
v2_root=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
if [[ -n $v2_root && -r $v2_root/cgroup.controllers ]] &&
        grep -qw memory "$v2_root/cgroup.controllers"; then
    # A child of our own cgroup if it hands the memory controller down; with
    # v2's no-internal-processes rule only the root usually does, so take the
    # nearest ancestor that does.
    self=$(awk -F: '$1 == "0" { print $3; exit }' /proc/self/cgroup)
    d=$v2_root${self%/}
    while :; do
        if [[ -r $d/cgroup.subtree_control ]] && grep -qw memory "$d/cgroup.subtree_control"; then
            CG_PARENT=$d
            break
        fi
        [[ $d == "$v2_root" || -z $d ]] && break
        d=${d%/*}
    done
    [[ -n $CG_PARENT ]] && CG_VERSION=2
fi
if [[ -z $CG_VERSION ]]; then
    v1_root=$(awk '$3 == "cgroup" && $4 ~ /(^|,)memory(,|$)/ { print $2; exit }' /proc/mounts)
    # Under our own memory cgroup, so whatever limits the caller has still apply.
    self_v1=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3; exit }' /proc/self/cgroup)
    self_v1=${self_v1%/}
    if [[ -n $v1_root && -w $v1_root$self_v1 ]]; then
        CG_VERSION=1
        CG_PARENT=$v1_root$self_v1
    fi
fi
[[ -n $CG_VERSION ]] || skip "no memory cgroup (neither cgroup v2 with the memory controller nor cgroup v1 memory is mounted)"
zswap=$(cat /sys/module/zswap/parameters/enabled 2>/dev/null || echo N)

# The tmemfs command (only needed to mount).
if [[ -n ${TMEMFS:-} ]]; then
    read -ra TMEMFS_CMD <<<"$TMEMFS"
elif [[ -x $ROOT/.venv/bin/tmemfs ]]; then
    TMEMFS_CMD=("$ROOT/.venv/bin/tmemfs")
elif command -v tmemfs >/dev/null 2>&1; then
    TMEMFS_CMD=(tmemfs)
elif [[ -f $ROOT/tmemfs/__init__.py ]]; then
    TMEMFS_CMD=(env "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -m tmemfs)
else
    TMEMFS_CMD=(python3 -m tmemfs)
fi

# ---------------------------------------------------------------- undo, always
MNT=""             # the tmemfs mount in use
MOUNTED=0          # 1: we mounted it, so we unmount it
MNT_DIR_MADE=0     # 1: we made the mount point directory
IMG=""             # the image tmemfs swap on made
LOOPDEV=""         # the loop device it attached (and swapped on)
SWAP_ON=0          # 1: tmemfs swap on succeeded
CG=""              # the cgroup we created
WL_PID=""          # timeout(1) running the workload
PROGRESS_PID=""    # the progress loop
TMPD=""            # scratch files
STARTED=0          # 1: the workload was started
SUMMARY_DONE=0
CLEANED=0

# shellcheck disable=SC2317  # called from the EXIT trap
step() {  # step SECONDS DESCRIPTION COMMAND...: run one undo step, never fail
    local secs=$1 what=$2
    shift 2
    if ! timeout -k 5 "$secs" "$@"; then
        warn "cleanup: $what failed; undo by hand: $*"
        return 1
    fi
}

# shellcheck disable=SC2317  # the EXIT trap
cleanup() {
    local rc=$? pids i
    trap '' INT TERM HUP PIPE
    set +e
    (( CLEANED )) && return
    CLEANED=1
    if [[ -n $PROGRESS_PID ]]; then
        kill "$PROGRESS_PID" 2>/dev/null
        wait "$PROGRESS_PID" 2>/dev/null
    fi
    if [[ -n $WL_PID ]]; then
        say "stopping the workload"
        kill -TERM "$WL_PID" 2>/dev/null
    fi
    if [[ -n $CG ]]; then  # nothing of ours may stay in the cgroup
        for i in $(seq 50); do
            pids=()
            read -r -d '' -a pids 2>/dev/null <"$CG/cgroup.procs"
            (( ${#pids[@]} )) || break
            (( i > 10 )) && kill -KILL "${pids[@]}" 2>/dev/null
            sleep 0.1
        done
    fi
    if [[ -n $WL_PID ]]; then
        wait "$WL_PID" 2>/dev/null
        WL_PID=""
    fi
    if (( STARTED && ! SUMMARY_DONE )); then
        summary - "INTERRUPTED"
    fi
    [[ -n $CG$LOOPDEV ]] || (( MOUNTED )) && say "cleaning up"
    if [[ -n $SAVED_PAGE_CLUSTER ]]; then
        echo "$SAVED_PAGE_CLUSTER" >/proc/sys/vm/page-cluster && SAVED_PAGE_CLUSTER=""
    fi
    if (( SWAP_ON )); then
        # swapoff, losetup -d, the image, and rmdir of the pool (its memory goes back).
        step 600 "tmemfs swap off $LOOPDEV" "${TMEMFS_CMD[@]}" swap off "$LOOPDEV" >/dev/null &&
            SWAP_ON=0
    fi
    if [[ -n $CG ]]; then
        for i in $(seq 50); do
            rmdir -- "$CG" 2>/dev/null && break
            sleep 0.1
        done
        [[ -d $CG ]] && warn "cleanup: could not remove cgroup $CG; undo by hand: rmdir $CG"
    fi
    if (( MOUNTED )); then
        if (( SWAP_ON )); then
            warn "cleanup: swap still on $LOOPDEV; leaving $MNT mounted"
        elif ! step 120 "tmemfs umount $MNT" "${TMEMFS_CMD[@]}" umount "$MNT"; then
            mountpoint -q -- "$MNT" && step 30 "umount $MNT" umount -- "$MNT"
        fi
    fi
    if (( MNT_DIR_MADE )) && ! mountpoint -q -- "$MNT"; then
        rmdir -- "$MNT" 2>/dev/null
    fi
    [[ -n $TMPD ]] && rm -rf -- "$TMPD"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

# ---------------------------------------------------------------- readings
swap_used_kib() {  # KiB of swap in use on our device
    awk -v d="$LOOPDEV" '$1 == d { print $4; f = 1 } END { if (!f) print 0 }' /proc/swaps
}
vmstat_get() { awk -v k="$1" '$1 == k { print $2; f = 1 } END { if (!f) print 0 }' /proc/vmstat; }
read_stats() { timeout 3 cat -- "$MNT/stats" 2>/dev/null || true; }
pool_stored() {  # stored_pages of our pool
    awk '$1 == "stored_pages" { print $2; f = 1 } END { if (!f) print 0 }' \
        "$MNT/frontswap/$POOL/.stats" 2>/dev/null || echo 0
}
stat_get() {  # stat_get NAME STATS-TEXT -> value, or "" if absent or not a number
    awk -v k="$1" '$1 == k && $2 ~ /^[0-9]+$/ { print $2; exit }' <<<"$2"
}
cg_read() { cat -- "$CG/$1" 2>/dev/null || echo 0; }
cg_mem() { if (( CG_VERSION == 2 )); then cg_read memory.current; else cg_read memory.usage_in_bytes; fi; }
cg_swap() {
    if (( CG_VERSION == 2 )); then
        cg_read memory.swap.current
    elif [[ -r $CG/memory.memsw.usage_in_bytes ]]; then
        echo $(( $(cg_read memory.memsw.usage_in_bytes) - $(cg_read memory.usage_in_bytes) ))
    else
        echo ""
    fi
}
cg_oom_kills() {
    local f=memory.events
    (( CG_VERSION == 1 )) && f=memory.oom_control
    awk '$1 == "oom_kill" { print $2; f = 1 } END { if (!f) print 0 }' "$CG/$f" 2>/dev/null || echo 0
}
now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

progress_loop() {
    trap - EXIT INT TERM HUP PIPE
    local st used out in stores loads stored orig compr cgs line peak=0 tick=0
    : >"$TMPD/samples"
    # Samples twice a second, a progress line once a second: a small run lasts a few
    # seconds, and its ratio needs more than two samples.
    while sleep 0.5; do
        used=$(swap_used_kib)
        (( used > peak )) && peak=$used && echo "$peak" >"$TMPD/peak_swap_kib"
        out=$(( $(vmstat_get pswpout) - OUT0 ))
        in=$(( $(vmstat_get pswpin) - IN0 ))
        st=$(read_stats)
        stores=$(stat_get stores "$st")
        loads=$(stat_get loads "$st")
        stored=$(pool_stored)
        orig=$(stat_get orig_data_size "$st")
        compr=$(stat_get compr_data_size "$st")
        # KiB of swap in use, pages stored in our pool, bytes the backend holds, pages
        # it holds in zstd (recompressed; 0 without the lz4 backend's recompression)
        rec=$(stat_get recompressed_pages "$st")
        echo "$used $stored $(stat_get pool_total_size "$st") ${rec:-0}" >>"$TMPD/samples"
        (( ++tick % 2 )) && continue
        printf -v line '[%6ss] swap used %s stored %s (%s pages, %sx) | pswpout +%d pswpin +%d | tmemfs stores +%s loads +%s compression %s | cgroup mem %s' \
            "$(elapsed "$T0")" "$(mib $(( used * 1024 )))" "$(mib $(( stored * PAGE )))" \
            "$stored" "$(ratio $(( stored * PAGE )) $(( used * 1024 )))" "$out" "$in" \
            "$(( ${stores:-0} - STORES0 ))" "$(( ${loads:-0} - LOADS0 ))" \
            "$(ratio "$orig" "$compr")" "$(mib "$(cg_mem)")"
        cgs=$(cg_swap)
        [[ -n $cgs ]] && line+=" swap $(mib "$cgs")"
        printf '%s\n' "$line"
    done
}

# summary RC|- RESULT: print the summary once, after the workload ended (-: stopped).
summary() {
    local rc=$1 result=$2 st out in stored orig compr total same stores loads rloads peak swapped oom
    SUMMARY_DONE=1
    out=$(( $(vmstat_get pswpout) - OUT0 ))
    in=$(( $(vmstat_get pswpin) - IN0 ))
    swapped=$(( out * PAGE ))
    peak=$(cat "$TMPD/peak_swap_kib" 2>/dev/null || echo 0)
    (( $(swap_used_kib) > peak )) && peak=$(swap_used_kib)
    oom=$(cg_oom_kills)
    echo
    echo "=== $PROG summary ==="
    row() { printf '%-22s %s\n' "$@"; }
    row "result:" "$result ($([[ $rc == - ]] && echo "workload stopped" || echo "workload exit status $rc"))"
    row "wall time:" "$(elapsed "$T0") s"
    row "working set:" "$(mib "$WS_BYTES") in cgroup v$CG_VERSION $CG, limit $(mib "$LIMIT_BYTES")"
    row "swap device:" "$LOOPDEV -> $IMG ($(mib "$IMAGE_BYTES")), peak in use $(mib $(( peak * 1024 )))"
    row "pages swapped out:" "$out ($(mib "$swapped")), /proc/vmstat pswpout, whole system"
    row "pages swapped in:" "$in ($(mib $(( in * PAGE )))), /proc/vmstat pswpin, whole system"
    st=$(read_stats)
    if [[ -z $st ]]; then
        row "tmemfs:" "no figures ($MNT/stats unreadable)"
    else
        stores=$(stat_get stores "$st")
        loads=$(stat_get loads "$st")
        stored=$(stat_get stored_pages "$st")
        orig=$(stat_get orig_data_size "$st")
        compr=$(stat_get compr_data_size "$st")
        total=$(stat_get pool_total_size "$st")
        same=$(stat_get same_filled_pages "$st")
        row "tmemfs stores/loads:" "+$(( ${stores:-0} - STORES0 )) / +$(( ${loads:-0} - LOADS0 )) pages since swapon"
        row "tmemfs stored_pages:" "${stored:-?} ($(mib "${orig:-0}") of page data, ${same:-?} same-filled), compressed to $(mib "${compr:-0}"), ratio $(ratio "$orig" "$compr")"
        row "tmemfs holds:" "$(mib "${total:-0}") (pool_total_size) for $(mib "${orig:-0}") of swapped pages = $(ratio $(( ${total:-0} * 100 )) "${orig:-0}")% of the swapped bytes"
        if [[ -s $TMPD/samples ]]; then
            # Over the samples with at least a tenth of the peak swap in use: while the
            # workload starts and exits, a few MiB in use make any ratio meaningless.
            row "stored vs swap in use:" "$(awk -v page="$PAGE" '
                { used[NR] = $1; stored[NR] = $2; if ($1 > top) top = $1; if ($2 > p) p = $2 }
                END { for (i = 1; i <= NR; i++) {
                          if (used[i] * 10 < top || used[i] == 0) continue
                          n++; u += used[i] * 1024; s += stored[i] * page
                          q = stored[i] * page / (used[i] * 1024); if (q > r) r = q }
                      printf "average %.2fx, peak %.2fx (%d samples, 0.5 s apart); peak %d pages stored",
                             (u ? s / u : 0), r, n, p }' "$TMPD/samples")"
            row "memory held:" "$(awk '
                { used[NR] = $1; held[NR] = $3; if ($1 >= u) { u = $1; t = $3 } }
                END { for (i = 1; i <= NR; i++)
                          if (used[i] && used[i] * 10 >= u) { n++; h += held[i] }
                      printf "%.1f MiB (pool_total_size) at the peak swap in use, %.1f MiB = %.0f%%; average %.1f MiB",
                             t / 1048576, u / 1024, (u ? 100 * t / (u * 1024) : 0), (n ? h / n / 1048576 : 0) }' "$TMPD/samples")"
            # What background recompression did while the workload ran, and what it cost
            # the page faults: the loads that had to decode zstd.
            rloads=$(stat_get recompressed_loads "$st")
            if [[ -n $rloads ]]; then
                row "recompressed:" "at most $(awk '$4 > m { m = $4 } END { print m + 0 }' "$TMPD/samples") pages in zstd at any sample; +$(( rloads - RLOADS0 )) loads met one since swapon"
            fi
        fi
        if [[ -n ${STORED_AFTER:-} ]]; then
            row "stored after exit:" "$STORED_AFTER"
            row "tmemfs holds after exit:" "$(mib "${total:-0}") (pool_total_size)"
        fi
        if (( ! DISCARD && ${orig:-0} > peak * 1024 )); then
            row "" "(includes slots that swap freed but did not discard: --no-discard)"
        fi
    fi
    if (( oom > 0 )); then
        row "OOM kills:" "$oom in the cgroup (swap too small, or too slow?)"
    fi
    if (( out == 0 )); then
        warn "the kernel swapped nothing out: is --limit ($LIMIT) well below --working-set ($WORKING_SET)?"
    fi
    printf '%s: %s\n' "$PROG" "$result"
}

# ---------------------------------------------------------------- set up
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/tmemfs-swap.state.XXXXXX")

if [[ -n $MOUNT ]]; then
    [[ -d $MOUNT ]] || die "--mount $MOUNT: not a directory"
    MNT=$(cd -- "$MOUNT" && pwd)
else
    MNT=$(mktemp -d "${TMPDIR:-/tmp}/tmemfs-swap.mnt.XXXXXX")
    MNT_DIR_MADE=1
    mount_opts=()
    [[ -n $BACKEND ]] && mount_opts+=(--backend "$BACKEND")
    [[ -n $MAX_POOL ]] && mount_opts+=(--max-pool "$MAX_POOL")
    [[ -n $RECOMPRESS_AFTER ]] && mount_opts+=(--recompress-after "$RECOMPRESS_AFTER")
    say "mounting tmemfs on $MNT: ${TMEMFS_CMD[*]} mount ${mount_opts[*]}${mount_opts[*]:+ }$MNT"
    if ! timeout 60 "${TMEMFS_CMD[@]}" mount "${mount_opts[@]}" "$MNT"; then
        mountpoint -q -- "$MNT" && MOUNTED=1
        die "could not mount tmemfs on $MNT (set TMEMFS=... to choose the command)"
    fi
    MOUNTED=1
    for _ in $(seq 100); do
        [[ -r $MNT/stats ]] && break
        sleep 0.1
    done
fi
[[ -d $MNT/frontswap ]] || die "$MNT is not a tmemfs mount (no frontswap/ directory)"
[[ -r $MNT/stats ]] || warn "$MNT/stats is not readable; tmemfs figures will be missing"

if [[ $PAGE_CLUSTER != keep ]]; then
    [[ $PAGE_CLUSTER =~ ^[0-9]$ ]] || usage_error "--page-cluster takes 0 to 9 or keep"
    SAVED_PAGE_CLUSTER=$(cat /proc/sys/vm/page-cluster)
    echo "$PAGE_CLUSTER" >/proc/sys/vm/page-cluster
    say "vm.page-cluster $PAGE_CLUSTER for this run (was $SAVED_PAGE_CLUSTER)"
fi

swap_opts=(--size "$IMAGE_BYTES" --priority 32767)
(( DISCARD )) || swap_opts+=(--no-discard)
say "${TMEMFS_CMD[*]} swap on ${swap_opts[*]} $MNT"
# On failure tmemfs swap on undoes its own steps; on success it prints the device.
if ! LOOPDEV=$(timeout 300 "${TMEMFS_CMD[@]}" swap on "${swap_opts[@]}" "$MNT" 2>"$TMPD/swap.err"); then
    LOOPDEV=""
    err=$(cat "$TMPD/swap.err")
    die "tmemfs swap on $MNT failed: $err"
fi
SWAP_ON=1
IMG=$(cat "/sys/block/${LOOPDEV##*/}/loop/backing_file")
POOL=$(basename -- "$IMG" .img)
dio=$(cat "/sys/block/${LOOPDEV##*/}/loop/dio" 2>/dev/null || echo "?")
other_swap=$(awk -v d="$LOOPDEV" 'NR > 1 && $1 != d' /proc/swaps | wc -l)
say "swap on $LOOPDEV -> $IMG (direct I/O: $([[ $dio == 1 ]] && echo on || echo "off; the page cache keeps a second copy"); discard: $( (( DISCARD )) && echo on || echo off))$( (( other_swap )) && echo "; $other_swap other swap device(s) active, vmstat counts are system-wide")"

CG=$CG_PARENT/tmemfs-swap-$$
mkdir -- "$CG" || { CG=""; die "could not create cgroup $CG_PARENT/tmemfs-swap-$$"; }
if (( CG_VERSION == 2 )); then
    echo "$LIMIT_BYTES" >"$CG/memory.max"
    # Keep the kernel's own zswap out of the way, so pages reach tmemfs.
    [[ -w $CG/memory.zswap.max ]] && echo 0 >"$CG/memory.zswap.max"
else
    echo "$LIMIT_BYTES" >"$CG/memory.limit_in_bytes"
    echo 100 >"$CG/memory.swappiness" 2>/dev/null || true
    [[ $zswap == Y ]] && warn "zswap is enabled: it catches swapped pages before they reach tmemfs (echo N > /sys/module/zswap/parameters/enabled)"
fi
say "cgroup v$CG_VERSION $CG: memory limit $(mib "$LIMIT_BYTES")"

# ---------------------------------------------------------------- run
st=$(read_stats)
STORES0=$(stat_get stores "$st"); STORES0=${STORES0:-0}
LOADS0=$(stat_get loads "$st"); LOADS0=${LOADS0:-0}
RLOADS0=$(stat_get recompressed_loads "$st"); RLOADS0=${RLOADS0:-0}
OUT0=$(vmstat_get pswpout)
IN0=$(vmstat_get pswpin)
T0=$(now)

say "running the workload: $(mib "$WS_BYTES") in $(mib "$LIMIT_BYTES"), $( (( TIMEOUT )) && echo "timeout ${TIMEOUT}s" || echo "no timeout")"
progress_loop &
PROGRESS_PID=$!
# The shell joins the cgroup, then becomes the workload: only it runs there.
# shellcheck disable=SC2016  # $$ and $1 belong to the inner sh
timeout -k 10 "$TIMEOUT" sh -c '
    echo $$ >"$1" || { echo "cannot join cgroup $1" >&2; exit 125; }
    shift
    exec "$@"' tmemfs-swap-workload "$CG/cgroup.procs" \
    "${PY[@]}" -u "$WORKLOAD" --working-set "$WS_BYTES" &
WL_PID=$!
STARTED=1
wl_rc=0
wait "$WL_PID" 2>/dev/null || wl_rc=$?  # no "Killed" job notice
WL_PID=""
kill "$PROGRESS_PID" 2>/dev/null || true
wait "$PROGRESS_PID" 2>/dev/null || true
PROGRESS_PID=""

# Swap frees the workload's slots as it exits and discards whole free clusters,
# asynchronously: give it a few seconds, then say what stays stored.
peak_stored=$(awk '$2 > p { p = $2 } END { print p + 0 }' "$TMPD/samples" 2>/dev/null || echo 0)
# Wait until stored_pages is below 10% of its peak and has stopped falling.
waited=0
stored_after=$(pool_stored)
before=-1
while (( DISCARD && waited < 30 && peak_stored > 0 )) &&
        (( stored_after * 10 >= peak_stored || stored_after != before )); do
    sleep 1
    waited=$(( waited + 1 ))
    before=$stored_after
    stored_after=$(pool_stored)
done
STORED_AFTER="$stored_after pages ($(ratio $(( stored_after * 100 )) "$peak_stored")% of the peak $peak_stored), ${waited} s after the workload ended"

case $wl_rc in
    0)   result=PASS; status=0 ;;
    124) result="FAIL: timed out after ${TIMEOUT}s"; status=124 ;;
    137) result="FAIL: workload killed (SIGKILL; out of memory?)"; status=1 ;;
    *)   result=FAIL; status=1 ;;
esac
summary "$wl_rc" "$result"
exit "$status"
