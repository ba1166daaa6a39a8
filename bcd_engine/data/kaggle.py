"""Downloading the ALL dataset from Kaggle with ``kagglehub`` (optional; needs internet and credentials)."""

from __future__ import annotations

from pathlib import Path

KAGGLE_DATASET = "mehradaria/leukemia"


def download_kaggle_dataset() -> tuple[Path | None, str]:
    """Download the ALL dataset with kagglehub; (folder, message), folder None with a clear reason on failure."""
    try:
        import kagglehub

        path = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except ImportError:
        return None, "kagglehub is not installed (pip install kagglehub); use a local folder instead."
    except Exception as exc:  # noqa: BLE001 - network, credentials, quota: all mean "not now"
        return None, (
            f"Could not download {KAGGLE_DATASET}: offline or no Kaggle credentials "
            f"({type(exc).__name__}: {str(exc)[:200]}). Use a local folder instead."
        )
    originals = sorted(path.rglob("Original"))
    folder = originals[0] if originals else path
    return folder, f"Downloaded to {folder}"
