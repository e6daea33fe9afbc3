"""tmemfs: transcendent memory (frontswap and cleancache pools) as a FUSE filesystem."""

__version__ = "0.1.0"
