"""What can go wrong in the engine, by meaning; the FUSE adapter maps each to one errno."""

from __future__ import annotations


class TmemError(Exception):
    """Base of every engine failure that a client can cause or observe."""


class BadName(TmemError):
    """A pool, object or page name that the tree does not allow (EINVAL on create)."""


class BadValue(TmemError):
    """A value written to a control file (.max, .weight) that it does not take (EINVAL)."""


class NoSuchPool(TmemError):
    """The pool was never created or has been flushed (ENOENT)."""


class NoSuchObject(TmemError):
    """The cleancache object does not exist (ENOENT)."""


class PoolExists(TmemError):
    """mkdir of a pool or object that already exists (EEXIST)."""


class StoreRejected(TmemError):
    """The backend refused a store: budget full, compresses poorly, or remote failure (ENOSPC)."""


class PageLost(TmemError):
    """A persistent page that must exist could not be read back (EIO)."""
