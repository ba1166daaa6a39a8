"""Where the engine keeps things: the database, model artifacts and caches.

Each location has a default under the project root and an environment variable that overrides it.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """SQLAlchemy URL of the run store: ``BCD_DATABASE_URL`` or ``results.db`` at the project root."""
    return os.environ.get("BCD_DATABASE_URL") or f"sqlite:///{PROJECT_ROOT / 'results.db'}"


def artifacts_dir() -> Path:
    """Folder for saved models: ``BCD_ARTIFACTS_DIR`` or ``artifacts/`` at the project root."""
    return Path(os.environ.get("BCD_ARTIFACTS_DIR") or PROJECT_ROOT / "artifacts")


def cache_dir() -> Path:
    """Folder for scan and feature caches: ``BCD_CACHE_DIR`` or ``.bcd_cache/`` at the project root."""
    return Path(os.environ.get("BCD_CACHE_DIR") or PROJECT_ROOT / ".bcd_cache")


def demo_mode(secret: object = None) -> bool:
    """Demo mode (browse and diagnose only): ``BCD_DEMO_MODE`` or a ``demo_mode`` secret set to a true value."""
    values = [os.environ.get("BCD_DEMO_MODE", ""), "" if secret is None else str(secret)]
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in values)


def demo_datasets() -> list[Path]:
    """Dataset folders a demo may show besides the synthetic set: ``BCD_DEMO_DATASETS``, ``os.pathsep``-separated.

    Only datasets whose terms allow showing them to anyone belong here (never the ALL dataset).
    """
    return [Path(item).expanduser() for item in os.environ.get("BCD_DEMO_DATASETS", "").split(os.pathsep) if item]
