"""Host -> device copies that never wait for the GPU.

A ``tensor.to("cuda")`` of an ordinary (pageable) CPU tensor makes the host wait until the stream
has finished every kernel queued before it: the driver stages pageable memory synchronously. The
DDTree glue builds a few small index arrays on the host every step (inside the verify forward, in
the sample and the commit), and each such copy stalled the host behind the GPU, so the host could
never run ahead and hide its own work under the GPU's (H100 step profile, 24 Nov 2026: 7 stream
syncs per DDTree step, 0 for flat DFlash).

``to_device`` copies through page-locked memory instead: ``pin_memory()`` takes a buffer from
torch's caching host allocator, and a ``non_blocking`` copy from it is queued on the stream; the
allocator keeps the buffer until that copy has run (it records an event on the stream), so the
caller may drop or overwrite its own tensor at once.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (converted to ``dtype`` first, on the host, when given).

    CPU -> CUDA goes through pinned memory without blocking the host; any other pair is a plain
    ``.to``. The result never aliases ``t`` when the devices differ."""
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def list_to_device(values, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A list of host numbers on ``device`` (the non-blocking form of
    ``torch.tensor(values, device=device)``, which stages pageable memory)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
