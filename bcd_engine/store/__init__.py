"""The run store: SQLAlchemy models, Alembic migrations and the :class:`RunStore` API.

Open it with ``RunStore()`` (``settings.database_url()``) or ``RunStore(url)`` for any SQLAlchemy
URL (``postgresql://`` URLs use psycopg 3). Everything it returns is a frozen record from
:mod:`bcd_engine.store.records`.
"""
from __future__ import annotations

from bcd_engine.store.models import FINAL_STATUSES, RUN_STATUSES
from bcd_engine.store.records import (
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    EvaluationRecord,
    PredictionRecord,
    RocCurve,
    RunRecord,
)
from bcd_engine.store.store import RunStore

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
