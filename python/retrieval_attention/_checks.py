"""Argument checks shared by the public functions: each raises TypeError/ValueError naming the argument."""
from __future__ import annotations

import numpy as np
import torch

FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)


def as_tensor(x, name: str) -> torch.Tensor:
    """torch.Tensor or numpy array -> tensor (numpy is wrapped without copying where possible)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.float64:
            return torch.from_numpy(x.astype(np.float32))
        try:
            return torch.from_numpy(np.ascontiguousarray(x))
        except TypeError as exc:
            raise TypeError(f"{name}: numpy dtype {x.dtype} is not supported") from exc
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_rank(t: torch.Tensor, rank: int, name: str, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(t.shape)}")


def check_float(t: torch.Tensor, name: str, allowed=FLOAT_STORAGE) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(a).replace("torch.", "") for a in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
