"""Inference: using a trained run.

``loading`` (a run's model, loaded safely), ``predict`` (probabilities with test-time augmentation),
``evaluate`` (a run on another folder), ``diagnosis`` (single images, batches, ensembles, with a
plain-words reading), ``explain`` (Grad-CAM).
"""

from bcd_engine.inference.diagnosis import Diagnoser, Source, sources_from_archive, sources_from_paths
from bcd_engine.inference.evaluate import evaluate_run_on_folder, load_label_map
from bcd_engine.inference.explain import GradCam, explain_image, explain_source, grad_cam, overlay
from bcd_engine.inference.loading import LoadedModel, load_run_model
from bcd_engine.inference.predict import measure_latency, predict_proba

__all__ = [
    "Diagnoser",
    "GradCam",
    "LoadedModel",
    "Source",
    "evaluate_run_on_folder",
    "explain_image",
    "explain_source",
    "grad_cam",
    "load_label_map",
    "load_run_model",
    "measure_latency",
    "overlay",
    "predict_proba",
    "sources_from_archive",
    "sources_from_paths",
]
