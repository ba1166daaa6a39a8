"""The thesis' classical baseline: hand-crafted colour, texture and nucleus-shape features with an SVM or
logistic regression, on the same group-aware holdout split and k-fold folds as the CNNs.

Texture is a grey-level co-occurrence matrix (GLCM) computed with numpy, with the property definitions
of scikit-image's ``graycoprops`` (scikit-image is not a bcd dependency).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from bcd_engine.data.images import load_images
from bcd_engine.data.scan import ScanResult
from bcd_engine.data.splits import DEFAULT_FRACTION
from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.metrics import evaluate_probabilities
from bcd_engine.protocols.audit import colour_features, holdout_data
from bcd_engine.protocols.crossval import DEFAULT_FOLDS, fold_splits, summarise_folds
from bcd_engine.store import Protocol

MODELS = ("svm", "logreg")  # the first is the default
IMAGE_SIZE = 128  # pixels a side the hand-crafted features are computed at, unless told otherwise
CALIBRATION_FOLDS = 5  # the SVM's sigmoid calibration, cross-validated group-aware on the training side
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
GLCM_ANGLES = (0, 45, 90, 135)  # degrees, as offsets (row, col) like scikit-image: 0 is to the right
_CHUNK = 64  # images per GLCM batch, to bound memory


def handcrafted_features(images) -> np.ndarray:
    """Per image: colour statistics, GLCM texture and shape of the largest dark (nucleus-like) region.

    ``images`` is (n, h, w, 3) uint8; returns (n, 54 + 32 + 4) float features.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ConfigError(f"expected uint8 RGB images of shape (n, h, w, 3), got {arr.dtype} {arr.shape}")
    gray = np.rint(arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return np.hstack([colour_features(arr), glcm_features(gray), np.stack([shape_features(g) for g in gray])])


def glcm_features(gray: np.ndarray) -> np.ndarray:
    """GLCM contrast, homogeneity, energy and correlation of uint8 grey images (n, h, w).

    Grey levels are quantised to 32; symmetric, normalised matrices for each distance and angle.
    Returns (n, len(GLCM_DISTANCES) * len(GLCM_ANGLES) * 4), properties varying fastest.
    """
    return np.concatenate([_glcm_chunk(gray[s : s + _CHUNK]) for s in range(0, len(gray), _CHUNK)])


def shape_features(gray: np.ndarray) -> np.ndarray:
    """Shape of the dark pixels of one uint8 grey image (h, w) after an Otsu threshold: 4 features.

    The share of pixels at or below the threshold, then for the largest 4-connected dark region (the
    nucleus-like blob): its share of the image, boundary pixels per pixel (perimeter / area), and the
    eccentricity of the ellipse with the same second moments.
    """
    dark = gray <= otsu_threshold(gray)
    labelled, n_regions = ndimage.label(dark)
    if n_regions == 0:
        return np.array([0.0, 0.0, 0.0, 0.0])
    region = labelled == 1 + np.argmax(np.bincount(labelled.ravel())[1:])
    area = region.sum()
    interior = ndimage.binary_erosion(region, border_value=0)
    rows, cols = np.nonzero(region)
    eigen = np.linalg.eigvalsh(np.cov(np.vstack([rows, cols])) if area > 1 else np.zeros((2, 2)))
    eccentricity = np.sqrt(1 - eigen[0] / eigen[1]) if eigen[1] > 0 else 0.0
    return np.array([dark.mean(), area / dark.size, (area - interior.sum()) / area, eccentricity])


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: the level t maximising between-class variance of (<= t, > t)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    weight = np.cumsum(hist)
    mass = np.cumsum(hist * np.arange(256))
    total, total_mass = weight[-1], mass[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight))
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def train_classical_baseline(
    scan: ScanResult,
    *,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    model: str = MODELS[0],
    progress: bool = False,
    val_fraction: float = DEFAULT_FRACTION,
    test_fraction: float = DEFAULT_FRACTION,
) -> dict[str, Any]:
    """Fit StandardScaler + SVM (sigmoid-calibrated) or logistic regression on hand-crafted features.

    Trained on the train + val side of the group-aware holdout split that ``train`` makes for the same
    seed and fractions (nothing is tuned) and evaluated on its test side with
    :func:`bcd_engine.evaluation.evaluate_probabilities`. ``seconds`` is the wall time, ``stage_seconds``
    its parts (load_images, features, fit_and_evaluate).
    """
    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {model!r}")
    started = time.perf_counter()
    images, labels, train, test = holdout_data(
        scan,
        seed=seed,
        image_size=image_size,
        progress=progress,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    loaded = time.perf_counter()
    features = handcrafted_features(images)
    featured = time.perf_counter()
    evaluation = _fit_and_evaluate(
        features, labels, scan.groups, train, test, model=model, seed=seed, class_names=list(scan.class_names)
    )
    finished = time.perf_counter()
    return {
        "model": model,
        "protocol": Protocol.holdout().label,
        "image_size": image_size,
        "seed": seed,
        "n_features": int(features.shape[1]),
        "n_train": len(train),
        "n_test": len(test),
        "test_accuracy": evaluation.accuracy,
        "macro_auc": evaluation.macro_auc,
        "macro_f1": evaluation.metrics["macro_f1"],
        "confidence_intervals": evaluation.metrics["confidence_intervals"],
        "per_class": evaluation.metrics["per_class"],
        "confusion_matrix": evaluation.confusion_matrix,
        "class_names": list(scan.class_names),
        "seconds": round(finished - started, 2),
        "stage_seconds": {
            "load_images": round(loaded - started, 2),
            "features": round(featured - loaded, 2),
            "fit_and_evaluate": round(finished - featured, 2),
        },
    }


def cross_validate_classical(
    scan: ScanResult,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    model: str = MODELS[0],
    progress: bool = False,
) -> dict[str, Any]:
    """The classical baseline under k-fold CV: the same group-aware folds as ``cv`` (``crossval.fold_splits``).

    Each fold fits on its training and validation images and is tested on the fold. Returns the
    shape of :func:`crossval.cross_validate`: ``protocol``, ``folds``, ``mean`` and ``std``.
    """

    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {model!r}")
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    started = time.perf_counter()
    images = load_images(scan.paths, image_size=image_size, progress=progress, description="baseline: loading")
    features = handcrafted_features(images)
    rows = []
    for fold, split in enumerate(
        fold_splits(scan.labels, scan.groups, folds=folds, val_fraction=DEFAULT_FRACTION, seed=seed), 1
    ):
        fit_on = np.sort(np.concatenate([split.train, split.val]))
        evaluation = _fit_and_evaluate(
            features,
            scan.labels,
            scan.groups,
            fit_on,
            split.test,
            model=model,
            seed=seed,
            class_names=list(scan.class_names),
        )
        rows.append(
            {
                "fold": fold,
                "n_train": len(fit_on),
                "n_test": len(split.test),
                "accuracy": evaluation.accuracy,
                "macro_auc": evaluation.macro_auc,
            }
        )
    return {
        "protocol": Protocol.kfold(folds=folds).label,
        "model": f"classical baseline ({model})",
        "image_size": image_size,
        "folds": rows,
        **summarise_folds(rows),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _fit_and_evaluate(features, labels, groups, train, test, *, model: str, seed: int, class_names: list[str]):
    """Scaler + SVM (sigmoid-calibrated) or logistic regression fitted on ``train``, evaluated on ``test``.

    The SVM's calibration folds are group-aware (see :func:`_calibration_folds`).
    """
    if model == "svm":
        calibration_cv = _calibration_folds(labels[train], groups[train], seed=seed)
        classifier = CalibratedClassifierCV(SVC(random_state=seed), cv=calibration_cv, ensemble=False)
    else:
        classifier = LogisticRegression(max_iter=5000, random_state=seed)
    pipeline = make_pipeline(StandardScaler(), classifier).fit(features[train], labels[train])
    # One column per class, zero for a class the training side lacked (a tiny class in one fold).
    probabilities = np.zeros((len(test), len(class_names)))
    probabilities[:, pipeline.classes_] = pipeline.predict_proba(features[test])
    return evaluate_probabilities(labels[test], probabilities, class_names=class_names, groups=groups[test])


def _calibration_folds(labels: np.ndarray, groups: np.ndarray, *, seed: int) -> list | int:
    """Cross-validation folds for the SVM's calibration: group-aware, so no duplicate group is on both
    sides of one, with as many folds (up to CALIBRATION_FOLDS) as the class with fewest groups allows.
    When a class is a single group, group-aware folds cannot keep it in every fold's training side, and
    plain stratified folds (scikit-learn's default) are used instead."""
    fewest_groups = min(len(np.unique(groups[labels == label])) for label in np.unique(labels))
    if fewest_groups < 2:
        return CALIBRATION_FOLDS
    folds = StratifiedGroupKFold(n_splits=min(CALIBRATION_FOLDS, fewest_groups), shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels, groups))


def _glcm_chunk(gray: np.ndarray) -> np.ndarray:
    """:func:`glcm_features` of a few images at once (one bincount per offset)."""
    n, h, w = gray.shape
    q = (gray.astype(np.int64) * GLCM_LEVELS) // 256
    i, j = np.meshgrid(np.arange(GLCM_LEVELS), np.arange(GLCM_LEVELS), indexing="ij")
    out = []
    for d in GLCM_DISTANCES:
        for angle in GLCM_ANGLES:
            dr, dc = -round(d * np.sin(np.radians(angle))), round(d * np.cos(np.radians(angle)))
            a = q[:, max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)]
            b = q[:, max(0, dr) : h - max(0, -dr), max(0, dc) : w - max(0, -dc)]
            codes = (np.arange(n)[:, None, None] * GLCM_LEVELS + a) * GLCM_LEVELS + b
            glcm = np.bincount(codes.ravel(), minlength=n * GLCM_LEVELS**2).reshape(n, GLCM_LEVELS, GLCM_LEVELS)
            glcm = glcm + glcm.transpose(0, 2, 1)
            p = glcm / np.maximum(glcm.sum(axis=(1, 2), keepdims=True), 1)
            out.append(_glcm_properties(p, i, j))
    return np.concatenate(out, axis=1)


def _glcm_properties(p: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(n, 4) contrast, homogeneity, energy, correlation of normalised GLCMs p (n, L, L), as graycoprops."""
    diff2 = (i - j) ** 2
    contrast = (p * diff2).sum(axis=(1, 2))
    homogeneity = (p / (1.0 + diff2)).sum(axis=(1, 2))
    energy = np.sqrt((p**2).sum(axis=(1, 2)))
    mean_i = (p * i).sum(axis=(1, 2))
    mean_j = (p * j).sum(axis=(1, 2))
    std_i = np.sqrt((p * (i - mean_i[:, None, None]) ** 2).sum(axis=(1, 2)))
    std_j = np.sqrt((p * (j - mean_j[:, None, None]) ** 2).sum(axis=(1, 2)))
    cov = (p * (i - mean_i[:, None, None]) * (j - mean_j[:, None, None])).sum(axis=(1, 2))
    flat = (std_i < 1e-15) | (std_j < 1e-15)
    correlation = np.where(flat, 1.0, cov / np.where(flat, 1.0, std_i * std_j))
    return np.stack([contrast, homogeneity, energy, correlation], axis=1)
