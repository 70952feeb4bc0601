"""Evaluate detectors: metrics at 0.5 and at the validation threshold, per source, calibration,
robustness, Grad-CAM, plots and a shareable report. ``evaluate`` is the one entry point."""

from deepfake_dist.evaluation.runner import evaluate

__all__ = ["evaluate"]
