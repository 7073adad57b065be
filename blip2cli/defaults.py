"""Defaults that depend on the machine, shared by the CLI's options, the job and the library."""

from __future__ import annotations

import os


def default_workers() -> int:
    """Threads decoding images ahead of the model: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def default_batch_size(device_type: str) -> int:
    """Images per model call: 16 on the CPU and mps, 32 on CUDA."""
    return {"cpu": 16, "mps": 16}.get(device_type, 32)


__all__ = ["default_batch_size", "default_workers"]
