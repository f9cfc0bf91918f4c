"""Metric writers (TensorBoard, JSONL) and the progress line."""
from evejax.metrics.progress import Progress
from evejax.metrics.writers import MetricWriter

__all__ = ['MetricWriter', 'Progress']
