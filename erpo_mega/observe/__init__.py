"""Observability: metrics to JSONL and TensorBoard, timers, progress, plots."""
