"""The run store: SQLAlchemy models, Alembic migrations and the :class:`RunStore` API.

Process entry points open it with ``RunStore.open(url)``, which creates or upgrades the schema and
marks dead runs interrupted; ``RunStore(url)`` only connects to a store that is ready, and writes
nothing. ``url`` is any SQLAlchemy URL (default ``settings.database_url()``; ``postgresql://`` URLs
use psycopg 3). Everything it returns is a frozen record from :mod:`bcd_engine.store.records`; a
run's protocol is a :class:`Protocol`. Where a run's files live, and finding them checked, is
:mod:`bcd_engine.store.artifacts`'s; how the database is reached and migrated :mod:`bcd_engine.store.engine`'s.
"""

from __future__ import annotations

from bcd_engine.store.jobs import JOB_KINDS, JobQueue, JobRecord
from bcd_engine.store.models import FINAL_STATUSES, RUN_STATUSES
from bcd_engine.store.records import (
    PROTOCOL_KINDS,
    TEST_EVALUATION,
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    EvaluationRecord,
    PredictionRecord,
    Protocol,
    RocCurve,
    RunDataset,
    RunProgress,
    RunRecord,
    latest_evaluation,
)
from bcd_engine.store.runs import RunStore

__all__ = [
    "FINAL_STATUSES",
    "JOB_KINDS",
    "PROTOCOL_KINDS",
    "RUN_STATUSES",
    "TEST_EVALUATION",
    "ArtifactRecord",
    "DatasetRecord",
    "EpochRecord",
    "EvaluationRecord",
    "JobQueue",
    "JobRecord",
    "PredictionRecord",
    "Protocol",
    "RocCurve",
    "RunDataset",
    "RunProgress",
    "RunRecord",
    "RunStore",
    "latest_evaluation",
]
