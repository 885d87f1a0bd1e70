"""The `repetition` metric (load with evaluate.load(<this folder>) or import repetition_metrics)."""

from .repetition import loop_detected, repetition_metrics

__all__ = ["loop_detected", "repetition_metrics"]
