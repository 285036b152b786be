"""``copy_state_lines`` (the sync-free recurrent-state commit): the Triton kernel (interpreter on CPU)
against the boolean-selection reference, on pools with padded line strides like vLLM's views."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddtree.ops.gdn import copy_state_lines  # noqa: E402
from ddtree.ops.gdn.api import HAS_TRITON  # noqa: E402
from ddtree.ops.gdn.commit import copy_state_lines_torch  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and (torch.cuda.is_available()
                                                      or os.environ.get("TRITON_INTERPRET") == "1")
                        else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _pool(lines, shape, padded):
    g = torch.Generator().manual_seed(lines)
    inner = int(torch.tensor(shape).prod())
    raw = torch.randn(lines, inner + (5 if padded else 0), generator=g).to(DEV)
    return raw[:, :inner].view(lines, *shape)  # line stride > line size when padded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_reference(backend, padded):
    pool = _pool(12, (2, 3, 5), padded)
    ref = pool.clone()
    src = torch.tensor([3, 7, 0, 9], device=DEV)
    dst = torch.tensor([1, 8, 2, 10], device=DEV)
    flags = torch.tensor([True, False, True, True], device=DEV)
    copy_state_lines_torch(ref, src, dst, flags)
    copy_state_lines(pool, src, dst, flags, check_values=True, backend=backend)
    assert torch.equal(pool, ref)
    assert torch.equal(pool[8], _pool(12, (2, 3, 5), padded)[8])  # unflagged line untouched
    assert torch.equal(pool[1], _pool(12, (2, 3, 5), padded)[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_flagged_is_a_no_op(backend):
    pool = _pool(4, (3, 4), False)
    before = pool.clone()
    copy_state_lines(pool, torch.tensor([0, 1], device=DEV), torch.tensor([2, 3], device=DEV),
                     torch.zeros(2, dtype=torch.bool, device=DEV), backend=backend)
    assert torch.equal(pool, before)


def test_bad_inputs_are_clear_errors():
    pool = _pool(4, (3, 4), False)
    with pytest.raises(ValueError, match="flags"):
        copy_state_lines(pool, torch.tensor([0], device=DEV), torch.tensor([1], device=DEV),
                         torch.ones(2, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="dst_lines"):
        copy_state_lines(pool, torch.tensor([0, 1], device=DEV), torch.tensor([9, 1], device=DEV),
                         torch.ones(2, dtype=torch.bool, device=DEV), check_values=True)
