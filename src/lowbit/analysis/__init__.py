"""Quantization analysis: per-layer error, distribution checks, sensitivity and fixes (:func:`analyze`)."""

from lowbit.analysis.analyze import AnalysisResult, analyze, analyze_converted

__all__ = ["AnalysisResult", "analyze", "analyze_converted"]
