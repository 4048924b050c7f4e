"""Calibration data (seeded token windows) and layer-by-layer capture of the two streams."""

from duogpt.calibration.data import calibration_ids

__all__ = ["calibration_ids"]
