#!/bin/bash
# Install (or remove) /sbin/mount.fuse.tmemfs, the helper that makes
# `mount -t fuse.tmemfs` and fuse.tmemfs lines in /etc/fstab work.
#
#   mount_helpers/install.sh               install to /sbin, for the tmemfs found below
#   mount_helpers/install.sh --uninstall   remove it again
#   TMEMFS=/opt/tmemfs/bin/tmemfs mount_helpers/install.sh
#   mount_helpers/install.sh --dir /tmp/x/sbin       install somewhere else (packaging, tests)
#
# mount(8) looks for helpers in /sbin (on merged-/usr systems that is /usr/sbin) and
# runs them with root's plain PATH, so the helper gets the absolute path of the tmemfs
# command written into it. That command is the first of: $TMEMFS; tmemfs of the
# active virtualenv ($VIRTUAL_ENV); .venv/bin/tmemfs of the clone this script is in;
# tmemfs on PATH. Reinstall after moving the virtualenv.

set -euo pipefail

PROG=install.sh
HELPER=mount.fuse.tmemfs
MARKER="# Installed by tmemfs mount_helpers/install.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
    echo "$PROG: $*" >&2
    exit 1
}

usage() {
    echo "usage: $PROG [--dir DIR] [--uninstall]"
    echo "  --dir DIR     where mount(8) finds the helper (default /sbin)"
    echo "  --uninstall   remove DIR/$HELPER (only one this script installed)"
    echo "  TMEMFS=PATH   the tmemfs command to run (default: found as described in $PROG)"
}

dir=/sbin
uninstall=0
while (($#)); do
    case $1 in
        --dir) (($# >= 2)) || die "--dir needs a directory"; dir=$2; shift ;;
        --dir=*) dir=${1#--dir=} ;;
        --uninstall) uninstall=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 1 ;;
    esac
    shift
done
target=$dir/$HELPER

if ((uninstall)); then
    if [[ ! -e $target ]]; then
        echo "$target is not installed"
        exit 0
    fi
    grep -qxF "$MARKER" "$target" || die "$target was not installed by $PROG; not removing it"
    rm -f -- "$target"
    echo "removed $target"
    exit 0
fi

find_tmemfs() {
    if [[ -n ${TMEMFS:-} ]]; then
        echo "$TMEMFS"
    elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/tmemfs ]]; then
        echo "$VIRTUAL_ENV/bin/tmemfs"
    elif [[ -x $HERE/../.venv/bin/tmemfs ]]; then
        echo "$(cd "$HERE/.." && pwd)/.venv/bin/tmemfs"
    elif command -v tmemfs; then
        :
    else
        return 1
    fi
}

tmemfs=$(find_tmemfs) || die "no tmemfs command found: pip install tmemfs, or set TMEMFS=/path/to/tmemfs"
[[ $tmemfs == /* ]] || tmemfs=$PWD/$tmemfs
[[ $tmemfs != *[$'\n'\'\"\\\$\`]* ]] || die "cannot write the path $tmemfs into a shell script"
[[ -x $tmemfs ]] || die "$tmemfs is not executable"
version=$("$tmemfs" --version 2>&1) || version=${version:-no answer}
if [[ $version != tmemfs* ]]; then
    die "$tmemfs --version did not answer as tmemfs does: ${version%%$'\n'*}"
fi

if [[ -e $target ]] && ! grep -qxF "$MARKER" "$target"; then
    die "$target exists and was not installed by $PROG; remove it first"
fi
[[ -d $dir ]] || die "$dir is not a directory"

# Write the helper with TMEMFS= filled in, then move it into place in one step, so
# that a mount running now never sees half a file.
tmp=$(mktemp "$dir/.$HELPER.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
found=0
{
    while IFS= read -r line; do
        if [[ $line == "TMEMFS=@TMEMFS@" ]]; then
            echo "$MARKER"
            echo "TMEMFS='$tmemfs'"
            found=1
        else
            printf '%s\n' "$line"
        fi
    done < "$HERE/$HELPER"
} > "$tmp"
((found)) || die "$HERE/$HELPER has no TMEMFS=@TMEMFS@ line"
chmod 0755 "$tmp"
mv -f -- "$tmp" "$target"
trap - EXIT
echo "installed $target (runs $tmemfs, $version)"
