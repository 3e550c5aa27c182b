"""Seeding torch's global generator cheaply.

``torch.manual_seed`` also queues a lazy seed for CUDA, XPU and MTIA; while none of them is
initialised each queued call formats a stack trace, about 4 ms a call, which a run pays for every
user and round (4 % of the test suite's time). Where no accelerator exists the queued seeds can
never take effect, so only the CPU generator is seeded: the same stream, bit for bit.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _has_accelerator() -> bool:
    checks = (lambda: torch.cuda.is_available(), lambda: torch.backends.mps.is_available(),
              lambda: torch.xpu.is_available(), lambda: torch.mtia.is_available())
    for check in checks:
        try:
            if check():
                return True
        except (AttributeError, RuntimeError):  # a backend this torch build lacks
            continue
    return False


def manual_seed(seed: int) -> None:
    """``torch.manual_seed(seed)``, skipping the accelerators' lazy seeding where there are none."""
    if _has_accelerator():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


__all__ = ["manual_seed"]
