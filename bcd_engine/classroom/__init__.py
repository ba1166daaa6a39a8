"""Class mode: heads trained in seconds on a class pack's cached features, bounded per session, written nowhere.

:mod:`~bcd_engine.classroom.pack` prepares, saves and loads packs (``prepare-class``);
:mod:`~bcd_engine.classroom.session` trains one head as a queued, bounded job;
:mod:`~bcd_engine.classroom.worker` runs those trainings in a child process of the server;
:mod:`~bcd_engine.classroom.host_runs` finds the store's runs on the same dataset.
"""

from bcd_engine.classroom.host_runs import HostRun, host_runs
from bcd_engine.classroom.pack import ClassPack, find_packs, load_pack, prepare_pack, save_pack
from bcd_engine.classroom.session import ClassResult, EpochScores, HeadSettings, HeadTraining, class_queue
from bcd_engine.classroom.worker import PackRef, RemoteTraining, class_worker

__all__ = [
    "ClassPack",
    "ClassResult",
    "EpochScores",
    "HeadSettings",
    "HeadTraining",
    "HostRun",
    "PackRef",
    "RemoteTraining",
    "class_queue",
    "class_worker",
    "find_packs",
    "host_runs",
    "load_pack",
    "prepare_pack",
    "save_pack",
]
