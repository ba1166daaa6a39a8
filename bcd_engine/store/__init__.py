"""The run store: SQLAlchemy models, Alembic migrations and the :class:`RunStore` API.

Open it with ``RunStore()`` (``settings.database_url()``) or ``RunStore(url)`` for any SQLAlchemy
URL (``postgresql://`` URLs use psycopg 3). Everything it returns is a frozen record from
:mod:`bcd_engine.store.records`.
"""
from __future__ import annotations

from .models import FINAL_STATUSES, RUN_STATUSES
from .records import (
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    EvaluationRecord,
    PredictionRecord,
    RocCurve,
    RunRecord,
)
from .store import RunStore

__all__ = [
    "FINAL_STATUSES",
    "RUN_STATUSES",
    "ArtifactRecord",
    "DatasetRecord",
    "EpochRecord",
    "EvaluationRecord",
    "PredictionRecord",
    "RocCurve",
    "RunRecord",
    "RunStore",
]
