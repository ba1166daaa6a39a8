"""How long a run will take, said before it is queued, from what this machine measured.

Most of a pretrained backbone's run is pushing images through the frozen backbone (every augmented training
view, the validation images, every test-time view). Each run records how fast its extraction went on this
host (:func:`record_extraction`, in ``<cache_dir>/extraction_rates.json``); :func:`estimate_run` turns a
config and a dataset size into views and seconds from the newest measurement of that backbone at that size.
A backbone not measured here yet is scaled from any other one measured here by its compute per image
(:attr:`BackboneSpec.gflops`, at its native size, growing with the square of the image size); on a host that
has measured nothing, from a rough guess per CPU core, and the estimate says it is rough.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass

from bcd_engine import settings
from bcd_engine.files import atomic_write_text
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import TrainConfig
from bcd_engine.progress import duration_text

GUESSED_GFLOPS_PER_CORE = 40.0  # what one CPU core does through a CNN when nothing was measured here (rough)
LONG_ON_CPU_S = 10 * 60  # a run longer than this gets the warning and the advice
OVERHEAD_S = 30.0  # scanning, loading, building, the head's epochs, saving: about, for a dataset of a few thousand
TRAINING_STEP_COST = 3.0  # a training pass (forward and backward) through the layers it trains, in forward passes
MIN_VIEWS_MEASURED = 64  # fewer views than this say too little about the rate to be kept


def rates_file():
    """Where this host's measured extraction rates are kept: ``<cache_dir>/extraction_rates.json``."""
    return settings.cache_dir() / "extraction_rates.json"


@dataclass(frozen=True)
class RunEstimate:
    """How long a run is expected to take, and why.

    ``views`` are the images pushed through the frozen backbone (training views, validation, test-time views);
    ``rate`` the views per second expected here (``measured``: from a run of this backbone at this size on this
    host; else scaled from another backbone measured here, or ``rough``: nothing measured here yet). ``warning``
    says, when the run will take long on a CPU, what would make it faster (None otherwise).
    """

    backbone: str
    image_size: int
    n_images: int
    views: int
    rate: float
    basis: str  # "measured", "scaled" or "rough"
    device: str
    seconds: float
    warning: str | None

    @property
    def summary(self) -> str:
        """One sentence: "About 12 min: 21,400 views through resnet50 at 22.1 views/s (measured on this machine)"."""
        basis = {
            "measured": "measured on this machine",
            "scaled": "scaled from another backbone measured on this machine",
            "rough": "a rough guess: nothing measured on this machine yet",
        }[self.basis]
        return (
            f"Estimated time: about {duration_text(self.seconds)} ({self.views:,} images and augmented views through "
            f"{self.backbone} at {self.image_size} px, {self.rate:.1f} a second, {basis})."
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "summary": self.summary}


def split_sizes(config: TrainConfig, n_images: int) -> tuple[int, int, int]:
    """About how many of ``n_images`` the config's split puts in training, validation and test."""
    n_val, n_test = round(n_images * config.val_fraction), round(n_images * config.test_fraction)
    return n_images - n_val - n_test, n_val, n_test


def forward_passes(config: TrainConfig, n_images: int) -> int:
    """Forward-pass equivalents a run of ``config`` on ``n_images`` images costs: the views extracted through the
    frozen backbone (none for a network trained end to end), phase 2's and end-to-end training's epochs (a training
    step costing TRAINING_STEP_COST passes) and the test-time views after phase 2."""
    n_train, n_val, n_test = split_sizes(config, n_images)
    if not get_backbone(config.backbone).pretrained:
        return round(config.epochs * (n_train * TRAINING_STEP_COST + n_val) + n_test * config.tta_views)
    extracted = n_train * config.augment.factor + n_val
    if config.fine_tune_epochs and config.fine_tune_layers:
        return round(
            extracted
            + config.fine_tune_epochs * (n_train * TRAINING_STEP_COST + n_val)
            + n_test * config.tta_views
            + n_images  # the OOD gate's features through the fine-tuned model
        )
    return extracted + n_test * config.tta_views


def record_extraction(config: TrainConfig, *, views: int, seconds: float, device: str) -> None:
    """Note that ``views`` views of ``config``'s backbone and image size took ``seconds`` on this host's ``device``
    (fewer than MIN_VIEWS_MEASURED are not kept). A file that cannot be written costs the next estimate only."""
    if views < MIN_VIEWS_MEASURED or seconds <= 0:
        return
    rates = _read_rates()
    host = rates.setdefault(_host_key(), {})
    host[f"{config.backbone}@{config.image_size}"] = {
        "rate": views / seconds,
        "views": int(views),
        "seconds": float(seconds),
        "device": device,
        "time": time.time(),
    }
    with contextlib.suppress(OSError):  # a cache: a read-only or full disk costs the next estimate only
        atomic_write_text(rates_file(), json.dumps(rates, indent=1, sort_keys=True))


def estimate_run(config: TrainConfig, n_images: int) -> RunEstimate:
    """How long ``config`` on a dataset of ``n_images`` images is expected to take on this host (see the module).

    >>> estimate_run(TrainConfig.for_backbone("resnet50", weights="imagenet"), 3256).views  # doctest: +SKIP
    22727
    """
    rate, basis, device = _expected_rate(config)
    views = forward_passes(config, n_images)
    seconds = _seconds(config, n_images)
    on_cpu = not device.upper().startswith("GPU")
    return RunEstimate(
        backbone=config.backbone,
        image_size=config.image_size,
        n_images=int(n_images),
        views=views,
        rate=rate,
        basis=basis,
        device=device,
        seconds=seconds,
        warning=_advice(config, n_images, seconds) if on_cpu and seconds > LONG_ON_CPU_S else None,
    )


def _seconds(config: TrainConfig, n_images: int) -> float:
    return forward_passes(config, n_images) / _expected_rate(config)[0] + OVERHEAD_S


def _advice(config: TrainConfig, n_images: int, seconds: float) -> str:
    """The plain warning: it will take long on this CPU, and what would make it faster (with the time each takes)."""
    options = []
    if config.augment.factor > 1:
        fewer = dataclasses.replace(
            config, augment=dataclasses.replace(config.augment, factor=config.augment.factor // 2)
        )
        options.append(
            f"fewer augmented views ({fewer.augment.factor} instead of {config.augment.factor}: about "
            f"{duration_text(_seconds(fewer, n_images))})"
        )
    if config.tta_views > 1:
        single = dataclasses.replace(config, tta_views=1)
        options.append(
            f"no test-time views (1 instead of {config.tta_views}: about {duration_text(_seconds(single, n_images))})"
        )
    smaller_size = max(get_backbone(config.backbone).min_size, int(config.image_size * 0.7) // 8 * 8)
    if smaller_size < config.image_size:
        smaller = dataclasses.replace(config, image_size=smaller_size)
        options.append(
            f"smaller images ({smaller_size} px: about {duration_text(_seconds(smaller, n_images))}; may cost accuracy)"
        )
    options.append("a machine with a GPU (usually ten times faster or more)")
    return (
        f"This run will take about {duration_text(seconds)} on this machine's CPU ({os.cpu_count()} cores). "
        "Faster: " + "; ".join(options) + "."
    )


def _expected_rate(config: TrainConfig) -> tuple[float, str, str]:
    """(views per second, basis, device) for ``config`` on this host."""
    spec = get_backbone(config.backbone)
    work = spec.gflops * (config.image_size / spec.native_size) ** 2  # GFLOPs a view
    measured = _read_rates().get(_host_key(), {})
    exact = measured.get(f"{config.backbone}@{config.image_size}")
    if exact:
        return exact["rate"], "measured", exact["device"]
    if measured:
        newest = max(measured.items(), key=lambda item: item[1]["time"])
        name, size = newest[0].rsplit("@", 1)
        other = get_backbone(name)
        machine_gflops = newest[1]["rate"] * other.gflops * (int(size) / other.native_size) ** 2
        return machine_gflops / work, "scaled", newest[1]["device"]
    cores = os.cpu_count() or 1
    return GUESSED_GFLOPS_PER_CORE * cores / work, "rough", f"CPU, {cores} cores (no GPU known)"


def _read_rates() -> dict:
    try:
        rates = json.loads(rates_file().read_text())
    except (OSError, ValueError):
        return {}
    return rates if isinstance(rates, dict) else {}


def _host_key() -> str:
    """This host and Keras backend (a rate measured on TensorFlow says little about JAX)."""
    return f"{socket.gethostname()}:{os.environ.get('KERAS_BACKEND', 'tensorflow')}"
