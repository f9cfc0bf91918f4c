"""Benchmark files (JSONL), converters from the common benchmarks, metrics and the harness."""
