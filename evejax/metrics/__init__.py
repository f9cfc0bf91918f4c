"""Metric writers (TensorBoard, JSONL), progress line, throughput and MFU, profiler window."""

from evejax.metrics.profiler import ProfileWindow
from evejax.metrics.progress import Progress
from evejax.metrics.throughput import Throughput, batch_counts
from evejax.metrics.writers import MetricWriter

__all__ = ['MetricWriter', 'ProfileWindow', 'Progress', 'Throughput', 'batch_counts']
