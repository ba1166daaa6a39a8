"""Which regions a run masks: ``mask_regions=auto`` resolved to concrete regions before the run trains.

``auto`` masks the regions the dataset declares (its ``regions.json``, :func:`read_declared_regions`) and
those :func:`score_regions` flags on the run's own training (fitted) and validation (scored) images, never
its test images. The config the run stores names the regions, so every consumer of the run masks the
same ones without auditing again; the run's config also keeps the decision and its reason (``"mask"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcd_engine import settings
from bcd_engine.data.images import load_images
from bcd_engine.data.regions import AUTO_REGIONS, Region, parse_regions, read_declared_regions, regions_text
from bcd_engine.data.scan import ScanResult
from bcd_engine.data.shortcuts import LAYOUT_SIZE, RegionAudit, score_regions
from bcd_engine.data.splits import Split
from bcd_engine.files import atomic_path
from bcd_engine.models.config import TrainConfig

AUDIT_CACHE_FORMAT = 1
log = logging.getLogger("bcd.training")


@dataclass(frozen=True)
class MaskDecision:
    """What a run masks (``regions``), what was asked (``setting``: auto, none or boxes) and why."""

    setting: str
    regions: tuple[Region, ...]
    reason: str
    audit: RegionAudit | None = None  # the region audit ``auto`` ran on the run's training and validation images

    def to_dict(self) -> dict:
        return {
            "setting": self.setting,
            "regions": [region.to_dict() for region in self.regions],
            "mask_regions": regions_text(self.regions),
            "reason": self.reason,
            "audit": None if self.audit is None else self.audit.to_dict(),
        }


def resolve_mask_regions(
    config: TrainConfig, scan: ScanResult, split: Split, *, cache_dir: Path | None = None
) -> tuple[TrainConfig, MaskDecision]:
    """``config`` with ``auto`` replaced by the regions :func:`auto_mask` finds, and the decision (``auto`` is
    logged on ``bcd.training``: which regions and why). A config naming regions or ``none`` is returned as it is."""
    if config.mask_regions != AUTO_REGIONS:
        regions = parse_regions(config.mask_regions)
        return config, MaskDecision(config.mask_regions, regions, "masked as asked" if regions else "nothing masked")
    decision = auto_mask(scan, split, seed=config.seed, cache_dir=cache_dir)
    log.info(
        "mask regions auto -> %s: %s",
        ", ".join(f"{r.name} ({r.to_text()})" for r in decision.regions) if decision.regions else "none",
        decision.reason,
    )
    return dataclasses.replace(config, mask_regions=regions_text(decision.regions)), decision


def auto_mask(scan: ScanResult, split: Split, *, seed: int = 0, cache_dir: Path | None = None) -> MaskDecision:
    """What ``auto`` masks for a run on ``scan`` with ``split``: the declared regions and those the region audit of
    its training and validation images flags.

    The region audit of a dataset and split is kept in ``<cache_dir>/region-audits`` (by the dataset's
    fingerprint, the split and the seed), so a second run on the same images does not audit again.
    """
    declared = read_declared_regions(scan.root)
    audit = _region_audit(scan, split, seed=seed, cache_dir=cache_dir) if len(split.val) else None
    flagged = () if audit is None else audit.flagged
    regions = declared + tuple(r for r in flagged if all(r.to_text() != d.to_text() for d in declared))
    reasons = [f"the dataset's regions.json declares {', '.join(r.name for r in declared)}"] if declared else []
    reasons.append(
        "no validation images to audit regions on" if audit is None else f"the region audit: {audit.reason()}"
    )
    return MaskDecision(AUTO_REGIONS, regions, "; ".join(reasons), audit)


def _region_audit(scan: ScanResult, split: Split, *, seed: int, cache_dir: Path | None) -> RegionAudit:
    fitted, scored = split.train, split.val
    key = hashlib.sha256(
        json.dumps(
            [AUDIT_CACHE_FORMAT, scan.fingerprint, seed, np.asarray(fitted).tolist(), np.asarray(scored).tolist()]
        ).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir or settings.cache_dir() / "region-audits") / f"{key}.json"
    try:
        return RegionAudit.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not audited yet, or a damaged file: audit again
    used = np.concatenate([fitted, scored])
    images = load_images([scan.paths[i] for i in used], image_size=LAYOUT_SIZE)
    labels = np.asarray(scan.labels)[used]
    audit = score_regions(images, labels, np.arange(len(fitted)), np.arange(len(fitted), len(used)), seed=seed)
    try:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(audit.to_dict()), encoding="utf-8")
    except OSError as exc:  # the cache only saves time
        log.warning("could not keep the region audit in %s: %s", path, exc)
    return audit
