"""Where the engine keeps things: the database, model artifacts and caches.

Each location has a default under the project root and an environment variable that overrides it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """SQLAlchemy URL of the run store: ``BCD_DATABASE_URL`` or ``results.db`` at the project root."""
    return os.environ.get("BCD_DATABASE_URL") or f"sqlite:///{PROJECT_ROOT / 'results.db'}"


def artifacts_dir() -> Path:
    """Folder for saved models: ``BCD_ARTIFACTS_DIR`` or ``artifacts/`` at the project root."""
    return Path(os.environ.get("BCD_ARTIFACTS_DIR") or PROJECT_ROOT / "artifacts")


def class_packs_dir() -> Path:
    """Folder of class packs (features cached by ``prepare-class``) that demo mode's class mode trains heads on:
    ``BCD_CLASS_DIR`` or ``class-packs/`` at the project root. Only the host writes there; visitors only read."""
    return Path(os.environ.get("BCD_CLASS_DIR") or PROJECT_ROOT / "class-packs")


def ray_address() -> str | None:
    """The Ray cluster the dashboard hands queued runs to: ``BCD_RAY_ADDRESS`` (e.g. ``auto``), else None (a local
    worker trains them)."""
    return os.environ.get("BCD_RAY_ADDRESS") or None


def weights_dir() -> Path:
    """Folder of local pretrained weights files the Train page offers: ``BCD_WEIGHTS_DIR`` or ``weights/`` at
    the project root (for machines that cannot download ImageNet weights)."""
    return Path(os.environ.get("BCD_WEIGHTS_DIR") or PROJECT_ROOT / "weights")


def cache_dir() -> Path:
    """Folder for scan and feature caches: ``BCD_CACHE_DIR``, else ``.bcd_cache/`` at the project root.

    When the project folder is read-only (a container, a read-only mount) and ``BCD_CACHE_DIR`` is not
    set, a private folder in the system's temporary folder instead (caches are only a speed-up).
    """
    configured = os.environ.get("BCD_CACHE_DIR")
    if configured:
        return Path(configured)
    default = PROJECT_ROOT / ".bcd_cache"
    if os.access(default if default.exists() else PROJECT_ROOT, os.W_OK):
        return default
    return _private_temp_folder("bcd-cache")


@functools.cache
def _private_temp_folder(name: str) -> Path:
    """``<tmp>/<name>-<uid>``, made readable by this user only; another user's folder of that name is not used."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / (name if uid is None else f"{name}-{uid}")
    folder.mkdir(mode=0o700, exist_ok=True)
    if uid is not None and (folder.is_symlink() or folder.stat().st_uid != uid):
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    return folder


def demo_mode(secret: object = None) -> bool:
    """Demo mode (browse and diagnose only): ``BCD_DEMO_MODE`` or a ``demo_mode`` secret set to a true value."""
    values = [os.environ.get("BCD_DEMO_MODE", ""), "" if secret is None else str(secret)]
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in values)


def demo_datasets() -> list[Path]:
    """Dataset folders a demo may show besides the synthetic set: ``BCD_DEMO_DATASETS``, ``os.pathsep``-separated.

    Only datasets whose terms allow showing them to anyone belong here (never the ALL dataset).
    """
    return [Path(item).expanduser() for item in os.environ.get("BCD_DEMO_DATASETS", "").split(os.pathsep) if item]
