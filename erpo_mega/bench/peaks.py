"""Peak dense TFLOP/s per device, for MFU (the figures peers use, docs/benchmarks.md).

Matched on the CUDA device name; bf16/fp16 dense tensor-core peaks without sparsity. fp32
training on a GPU is compared against the TF32 peak. A CPU has no entry: MFU is null there
unless `--peak-tflops` says what to compare against.
"""

from __future__ import annotations

# substring of torch.cuda.get_device_name() -> (bf16 dense, tf32 dense) TFLOP/s
PEAKS: list[tuple[str, float, float]] = [
    ("GB200", 2450.0, 1225.0),
    ("B200", 2250.0, 1100.0),
    ("H200", 989.4, 494.7),
    ("H100", 989.4, 494.7),
    ("H800", 989.4, 494.7),
    ("H20", 148.0, 74.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
]


def lookup_peak(device_name: str, bf16: bool = True) -> float | None:
    """Peak TFLOP/s for a device name (case-insensitive substring match), None if unknown."""
    name = device_name.upper()
    for key, bf16_peak, tf32_peak in PEAKS:
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None


def device_name() -> str:
    """This process's accelerator name, or 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def resolve_peak(override: float | None, name: str, bf16: bool) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from): `--peak-tflops` wins over the table."""
    if override:
        return float(override), "--peak-tflops"
    peak = lookup_peak(name, bf16)
    return (peak, f"table ({name}, {'bf16' if bf16 else 'tf32'})") if peak else (None, f"unknown device {name!r}")
