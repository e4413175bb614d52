"""Editing a model that is used by several threads or spread over several processes:
the read/write lock that lets a model serve while it is edited and the hooks that act for
one thread only (:mod:`.concurrency`), and tensor-parallel (``DTensor``) weights, their
collectives and the shift of row-sharded modules (:mod:`.distributed`)."""

from .concurrency import serving

__all__ = ["serving"]
