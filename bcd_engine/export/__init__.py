"""Export: a run's verified model as ``.keras`` or TensorFlow Lite, with ``labels.json`` and a model card.

``bundle`` (:func:`export_run`), ``card`` (``MODEL_CARD.md``), ``tflite`` (conversion, checked against Keras).
"""

from bcd_engine.export.bundle import FORMATS, ExportResult, export_run, labels_document
from bcd_engine.export.card import model_card

__all__ = ["FORMATS", "ExportResult", "export_run", "labels_document", "model_card"]
