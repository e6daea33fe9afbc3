"""The FUSE ceiling: the smallest pyfuse3 filesystem that keeps its bytes in dicts.

    python -m bench.barefs MOUNTPOINT [--size MIB]

It serves `img` (a file of fixed size, its 4 KiB pages in a dict) and directories made
with mkdir holding page files (each kept as bytes), all with direct I/O as tmemfs
serves them, and nothing else: no compression, no budget, no counters. What tmemfs does
beyond this is its own cost; the bench prints tmemfs's rates as ratios of this one's.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time

import pyfuse3
import trio

PAGE = 4096
IMG = pyfuse3.ROOT_INODE + 1


class BareFS(pyfuse3.Operations):
    """Bytes in dicts behind the same tree shapes the bench drives on tmemfs."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.image: dict[int, bytes] = {}
        self.dirs: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {b"img": IMG}}
        self.files: dict[int, bytes] = {}
        self.next_inode = IMG + 1

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode in self.dirs:
            attr.st_mode = stat.S_IFDIR | 0o755
        else:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_size = self.size if inode == IMG else PAGE
        now = time.time_ns()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        attr.st_blksize = PAGE
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    def _new(self, parent: int, name: bytes) -> int:
        inode = self.dirs[parent][name] = self.next_inode
        self.next_inode += 1
        return inode

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == IMG or inode in self.dirs or inode in self.files:
            return self._attr(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self.dirs.get(parent, {}).get(name)
        if inode is not None:
            return self._attr(inode)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        return attr  # a negative entry

    async def mkdir(
        self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name in self.dirs[parent]:
            raise pyfuse3.FUSEError(errno.EEXIST)
        inode = self._new(parent, name)
        self.dirs[inode] = {}
        return self._attr(inode)

    async def rmdir(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        inode = self.dirs[parent].pop(name)
        for child in self.dirs.pop(inode).values():
            self.files.pop(child, None)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self.dirs[parent].get(name)
        if inode is None:
            inode = self._new(parent, name)
            self.files[inode] = bytes(PAGE)
        return pyfuse3.FileInfo(fh=inode, direct_io=True), self._attr(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh != IMG:
            return self.files[fh][off : off + size]
        end = min(off + size, self.size)
        first, last = off // PAGE, (end - 1) // PAGE
        zero = bytes(PAGE)
        data = b"".join(self.image.get(i, zero) for i in range(first, last + 1))
        return data[off - first * PAGE : end - first * PAGE]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh != IMG:
            self.files[fh] = bytes(buf[:PAGE]).ljust(PAGE, b"\0")
            return len(buf)
        view = memoryview(buf)
        for pos in range(0, len(buf), PAGE):  # the bench writes whole pages
            self.image[(off + pos) // PAGE] = bytes(view[pos : pos + PAGE])
        return len(buf)

    async def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        inode = self.dirs[parent].pop(name, None)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.files.pop(inode, None)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        return

    async def release(self, fh: int) -> None:
        return

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--size", type=int, default=1024, help="image MiB (default 1024)")
    args = parser.parse_args()
    pyfuse3.init(BareFS(args.size << 20), args.mountpoint, {"fsname=barefs", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    os.umask(0o022)
    main()
