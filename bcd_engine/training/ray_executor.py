"""Runs, folds and rounds on a Ray cluster: the run store says what to train, Ray trains it.

The store stays the one source of truth. :func:`run_ray_worker` (``python -m bcd_engine worker --executor
ray``) claims queued runs from it, as many as the cluster has room for, and trains each in a Ray task with
the resources one run needs (GPUs when the cluster has them, else CPUs). The task takes the run over
(:meth:`RunStore.hand_over`: its host, pid and a ``ray:<node ip>:<pid>`` worker id), so cancelling through
the store and finding a dead process work as with the local worker. A task whose worker process or node
dies leaves its run ``interrupted``, never ``running``; tasks are never retried, so no run trains twice.
:class:`RayExecutor` runs a protocol's folds or rounds as parallel tasks.

Every node needs bcd at the same path as here, the store's URL reachable (PostgreSQL for several
machines) and the dataset and artifacts folders at the same paths (shared storage). Ray is optional
(``requirements-cluster.txt``) and imported only when one of these functions is called.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from bcd_engine import settings
from bcd_engine.errors import ClusterError, ConfigError, DataError
from bcd_engine.store import JobQueue, RunStore
from bcd_engine.store.engine import mask_url
from bcd_engine.training import worker

RAY_MISSING = "Ray is not installed: pip install -r requirements-cluster.txt"
DEFAULT_CPUS_PER_RUN = 1
DEFAULT_GPUS_PER_RUN = 1
log = logging.getLogger("bcd.ray")


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


def connect(address: str | None):
    """This process connected to the Ray cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``);
    the ``ray`` module. A process already connected (``ray.init`` called) stays on its cluster."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach a Ray cluster at {address!r}: {exc} (start one with `ray start --head`)"
            ) from None
    return ray


def _task_env(database_url: str) -> dict:
    """The runtime environment of a task: this checkout on the path, this store, artifacts folder and BCD_* settings."""
    env = {name: value for name, value in os.environ.items() if name.startswith("BCD_")}
    env.update(
        BCD_DATABASE_URL=database_url,
        BCD_ARTIFACTS_DIR=str(settings.artifacts_dir()),
        TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(settings.PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    )
    return {"env_vars": env}


def run_resources(ray, *, cpus_per_run: int = DEFAULT_CPUS_PER_RUN, gpus_per_run: int = DEFAULT_GPUS_PER_RUN) -> dict:
    """Ray task options for one run: ``gpus_per_run`` GPUs when the cluster has GPUs, else ``cpus_per_run`` CPUs."""
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": gpus_per_run, "num_cpus": 1}
    return {"num_cpus": cpus_per_run}


def _capacity(ray, resources: dict) -> int:
    """How many runs with ``resources`` the cluster holds at once (at least one)."""
    total = ray.cluster_resources()
    if resources.get("num_gpus"):
        return max(1, int(total.get("GPU", 0) // resources["num_gpus"]))
    return max(1, int(total.get("CPU", 0) // resources["num_cpus"]))


def node_name() -> str:
    """This node's IP address as Ray knows it (the host name outside Ray)."""
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - a name is only a label
        return socket.gethostname()


def require_visible(folder: str | os.PathLike, node: str) -> None:
    """``DataError`` unless ``folder`` is a folder this node can see."""
    if not Path(folder).is_dir():
        raise DataError(
            f"data folder {folder} is not visible on node {node}: put the dataset at the same path on "
            "every node (or on storage they share)"
        )


def _train_queued_run(run_id: int, claimed_by: str) -> str:
    """In a Ray task: take the claimed run over from the driver and train it; its final status."""
    node = node_name()
    with RunStore(settings.database_url()) as store:
        store.hand_over(run_id, claimed_by=claimed_by, worker_id=f"ray:{node}:{os.getpid()}")
        run = store.get_run(run_id)
        try:
            require_visible(run.config["data_dir"], node)
        except DataError as exc:
            store.finish_run(run_id, status="failed", error=f"DataError: {exc}")
            return "failed"
        return worker.train_stored(store, run)


@functools.cache
def _remote(function: Callable):
    """``function`` as a Ray remote function that is never retried (a lost run is interrupted, not run again)."""
    return _ray().remote(max_retries=0)(function)


def _close(store: RunStore, run_id: int, status: str, error: str) -> str:
    """Close a run its task left running (``status`` and ``error``); the run's final status."""
    if store.get_run(run_id).status == "running":
        store.finish_run(run_id, status=status, error=error)
    return store.get_run(run_id).status


def _outcome(ray, store: RunStore, ref, run_id: int) -> str:
    """The final status of a run whose task ended; a task that failed or died closes its run here."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # bcd's own code raised in the task (e.g. the store went away)
        cause = exc.cause if exc.cause is not None else exc
        return _close(store, run_id, "failed", f"{type(cause).__name__}: {str(cause).splitlines()[0]}")
    except ray.exceptions.RayError as exc:  # the worker process or its node died, or the task was cancelled
        return _close(
            store,
            run_id,
            "interrupted",
            f"interrupted: the Ray worker training it was lost "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]})",
        )


def run_ray_worker(
    *,
    address: str | None,
    database_url: str | None = None,
    once: bool = False,
    cpus_per_run: int = DEFAULT_CPUS_PER_RUN,
    gpus_per_run: int = DEFAULT_GPUS_PER_RUN,
    poll_seconds: float = worker.POLL_SECONDS,
    run_job: worker.JobRunner | None = None,
) -> list[dict]:
    """Train queued runs as Ray tasks on the cluster at ``address``; ``[{"run_id", "status"}, ...]`` of those taken.

    With ``run_job``, a protocol job queued from the dashboard is taken when no run is in flight or waiting, and run
    here (its folds or rounds go to the cluster through :class:`RayExecutor`); it adds ``{"job_id", "status"}``.

    At most as many runs are claimed as the cluster has room for, so a run shown ``running`` is training.
    With ``once`` it returns when the queue is empty and every task has ended; otherwise it polls every
    ``poll_seconds``. It keeps the worker heartbeat file like the local worker (so the dashboard starts no
    other). If it is stopped, its tasks are cancelled and their runs marked interrupted.
    """
    ray = connect(address)
    url = database_url or settings.database_url()
    store = RunStore.open(url)
    claim_id = f"ray:{node_name()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    resources = {
        **run_resources(ray, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run),
        "runtime_env": _task_env(url),
    }
    task = _remote(_train_queued_run)
    in_flight: dict = {}  # task ref -> run id
    done: list[dict] = []
    try:
        while True:
            worker.write_heartbeat(worker_id=claim_id)
            store.recover_interrupted()
            while len(in_flight) < _capacity(ray, resources):
                run = store.claim_next_queued(worker_id=claim_id)
                if run is None:
                    break
                log.info("run %s (%s) to the Ray cluster", run.id, run.backbone)
                in_flight[task.options(**resources).remote(run.id, claim_id)] = run.id
            if in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_seconds)
                for ref in ready:
                    run_id = in_flight.pop(ref)
                    done.append({"run_id": run_id, "status": _outcome(ray, store, ref, run_id)})
                    log.info("run %s %s", run_id, done[-1]["status"])
            elif run_job is not None and (job := JobQueue(store).claim_next(worker_id=claim_id)) is not None:
                done.append({"job_id": job.id, "status": worker.run_claimed_job(store, job, run_job, claim_id)})
            elif once:
                worker.remove_heartbeat(claim_id)
                if not store.list_runs(status="queued", limit=1) and not JobQueue(store).list(status="queued", limit=1):
                    return done
            else:
                time.sleep(poll_seconds)
    except BaseException:  # stopped (Ctrl-C) or broken: no run it took is left running
        for ref, run_id in in_flight.items():
            ray.cancel(ref, force=True)
            _close(store, run_id, "interrupted", "interrupted: the Ray worker that took it was stopped")
        worker.remove_heartbeat(claim_id)
        raise


def _work_on_node(work: Callable, item):
    """In a Ray task: ``work(store, item)`` on this node's connection to the store."""
    with RunStore(settings.database_url()) as store:
        return work(store, item)


class RayExecutor:
    """A protocol's folds or rounds as parallel Ray tasks (see :mod:`bcd_engine.training.executor`)."""

    def __init__(
        self,
        address: str | None,
        *,
        database_url: str | None = None,
        cpus_per_run: int = DEFAULT_CPUS_PER_RUN,
        gpus_per_run: int = DEFAULT_GPUS_PER_RUN,
    ):
        self.address, self.database_url = address, database_url or settings.database_url()
        self.cpus_per_run, self.gpus_per_run = cpus_per_run, gpus_per_run

    def map(self, work: Callable, items: Sequence, *, store: RunStore) -> list:
        """``[work(store, item) for item in items]``, each call a Ray task on its own connection to the same store.

        An error ``work`` raises is raised here as it was raised there; a task lost with its worker raises
        ``ClusterError`` (the run it was training is marked interrupted once its heartbeat goes stale).
        """
        if store.url != mask_url(self.database_url):
            raise ConfigError(f"the Ray executor writes to {mask_url(self.database_url)}, not to {store.url}")
        ray = connect(self.address)
        options = {
            **run_resources(ray, cpus_per_run=self.cpus_per_run, gpus_per_run=self.gpus_per_run),
            "runtime_env": _task_env(self.database_url),
        }
        task = _remote(_work_on_node).options(**options)
        refs = [task.remote(work, item) for item in items]
        try:
            return ray.get(refs)
        except BaseException as exc:
            for ref in refs:  # the others stop too, as the local loop stops at its first error
                ray.cancel(ref, force=True)
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise (exc.cause if exc.cause is not None else exc) from None
            if isinstance(exc, ray.exceptions.RayError):
                raise ClusterError(
                    f"a Ray task was lost: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                ) from None
            raise


def ensure_ray_worker(store: RunStore, address: str) -> bool:
    """Start a background ``worker --executor ray --ray-address ADDRESS --once`` when runs are queued and no
    worker is alive; True when one was started (the dashboard's glue, as :func:`worker.ensure_worker`)."""
    return worker.ensure_worker(store, "--executor", "ray", "--ray-address", address)


def cluster_status(address: str, *, store: RunStore) -> dict:
    """The cluster at ``address``: ``{"address", "nodes": [{"node", "alive", "cpus", "gpus"}], "cpus", "gpus",
    "available_cpus", "available_gpus", "running": [run ids on Ray], "queued": N}``."""
    ray = connect(address)
    nodes = [
        {
            "node": n.get("NodeManagerAddress"),
            "alive": bool(n.get("Alive")),
            "cpus": n.get("Resources", {}).get("CPU", 0),
            "gpus": n.get("Resources", {}).get("GPU", 0),
        }
        for n in ray.nodes()
    ]
    total, free = ray.cluster_resources(), ray.available_resources()
    running = [run.id for run in store.list_runs(status="running") if (run.worker_id or "").startswith("ray:")]
    return {
        "address": address,
        "nodes": nodes,
        "cpus": total.get("CPU", 0),
        "gpus": total.get("GPU", 0),
        "available_cpus": free.get("CPU", 0),
        "available_gpus": free.get("GPU", 0),
        "running": sorted(running),
        "queued": len(store.list_runs(status="queued")),
    }
