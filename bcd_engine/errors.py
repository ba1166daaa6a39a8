"""The engine's error types: one root, specific subclasses.

Pages and the CLI catch :class:`BCDError` and show its message; anything else is a bug.
"""

from __future__ import annotations


class BCDError(Exception):
    """Root of every error the engine raises on purpose (bad input, missing files, ...)."""


class DataError(BCDError):
    """A dataset folder or image cannot be used (missing, empty, one class, unreadable)."""


class ConfigError(BCDError):
    """A configuration value is invalid (unknown backbone, image size too small, ...)."""


class StoreError(BCDError):
    """The run store cannot be reached or a record is missing."""


class RunNotFoundError(StoreError):
    """No run has the given id."""


class RecordError(StoreError):
    """A value handed to the store is not one it keeps (an unknown subset or status, a naive timestamp, ...)."""


class ImageLoadError(DataError):
    """One image file cannot be read as a supported image."""


class ArchiveError(DataError):
    """An uploaded archive is refused: not a zip, corrupt, unsafe member paths, or it expands too far."""


class BundleError(BCDError):
    """A run bundle is refused: not a bundle, a member missing or extra, a checksum that does not match, an unsafe
    or broken model, or sizes beyond its limits."""


class RerunError(BCDError):
    """A stored run cannot be queued again: it is still queued or running, or the queue cannot train it so."""


class WriteError(BCDError):
    """A file or folder cannot be written (disk full, read-only file system, no permission)."""


class CancelledError(BCDError):
    """Work was cancelled: a run through the store while it was running, a queued diagnosis whose visitor left."""


class BusyError(BCDError):
    """The server's shared inference queue is full; the visitor should try again shortly."""


class ClusterError(BCDError):
    """A Ray cluster cannot be used: Ray is not installed, no cluster answers at the address, or a task was lost."""
