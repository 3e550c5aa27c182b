"""Checkpoint I/O: a run's whole state written atomically after each round, read back on --resume."""
from __future__ import annotations

from pathlib import Path

import torch

from semfl.files import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, empty, not a checkpoint): the user's to fix."""


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda h: torch.save(state, h))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint holds tensors and plain containers only, so it is read with ``weights_only=True``:
    a checkpoint from elsewhere cannot run code when it is loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]  # torch's can run to many lines
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason}); restore it from a copy, or rerun into "
                              "a new folder") from None
