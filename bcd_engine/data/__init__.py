"""Data: image folders and what can be known about them before any model sees them.

``images`` (decode one file safely, load many), ``scan`` (a class-per-subfolder dataset, its duplicates),
``dedup`` (near-duplicates in every flip and turn), ``splits`` (group-aware, stratified), ``archives``
(safe zip uploads), ``colour`` (stain-colour normalisation), ``synthetic`` (the demo set), ``kaggle``.
"""

from bcd_engine.data.archives import ArchiveContents, is_zip, read_archive
from bcd_engine.data.colour import COLOUR_MODES, NORMALISATION_METHODS, apply_colour_mode, normalise_colour
from bcd_engine.data.dedup import NEAR_DUPLICATE_DISTANCE, near_copies
from bcd_engine.data.images import SUPPORTED_EXTENSIONS, decode_image, image_array, load_image, load_images
from bcd_engine.data.scan import ImageRecord, ScanResult, folder_signature, scan_dataset
from bcd_engine.data.splits import DEFAULT_FRACTION, Split, group_kfold, holdout_split, split_from_assignments
from bcd_engine.data.synthetic import ensure_demo_dataset, make_synthetic_dataset

__all__ = [
    "COLOUR_MODES",
    "DEFAULT_FRACTION",
    "NEAR_DUPLICATE_DISTANCE",
    "NORMALISATION_METHODS",
    "SUPPORTED_EXTENSIONS",
    "ArchiveContents",
    "ImageRecord",
    "ScanResult",
    "Split",
    "apply_colour_mode",
    "decode_image",
    "ensure_demo_dataset",
    "folder_signature",
    "group_kfold",
    "holdout_split",
    "image_array",
    "is_zip",
    "load_image",
    "load_images",
    "make_synthetic_dataset",
    "near_copies",
    "normalise_colour",
    "read_archive",
    "scan_dataset",
    "split_from_assignments",
]
