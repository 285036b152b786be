"""The per-layer tree-attention work needs no device->host sync once the plan is built from host
lengths: every device tensor here lives on the ``meta`` device, where any read of tensor values
(.item(), int(), .cpu(), boolean-mask indexing, nonzero) raises. On CPU values, the precomputed
write-back indices give exactly what the boolean-mask write gives."""

import dataclasses

import pytest
import torch

from ddtree.attention.batched import (move_paged_kv_rows, paged_kv_rows,
                                      paged_tree_attention_chunked, plan_tree_attention,
                                      tree_attention_batched, write_tree_rows)

PREFIXES, QLENS = [3, 40, 17], [5, 9, 1]


def _host_inputs(Q=9):
    E = len(QLENS)
    vis = torch.tril(torch.ones(Q, Q, dtype=torch.bool)).expand(E, Q, Q).clone()
    depths = torch.arange(Q).expand(E, Q).clone()
    return (torch.tensor([0, 2, 3]), torch.tensor([0, 6, 16]), torch.tensor(PREFIXES),
            torch.tensor(QLENS), vis, depths)


def test_meta_device_detects_syncs():
    x = torch.zeros(4, device="meta")
    for read in (lambda: x[x > 0], lambda: x.nonzero(), lambda: x.cpu(), lambda: int(x.sum())):
        with pytest.raises((NotImplementedError, RuntimeError)):
            read()


@pytest.mark.parametrize("window", [None, 5])
def test_layers_and_moves_run_without_sync(window):
    table = torch.zeros(4, 8, dtype=torch.int32, device="meta")
    plan = plan_tree_attention(table, 16, *_host_inputs())
    cache = torch.empty(32, 2, 16, 2 * 8, device="meta")
    query = torch.empty(20, 4, 8, device="meta")
    output = torch.zeros_like(query)
    for _layer in range(2):  # the second layer reuses the plan's mask
        k, v = paged_kv_rows(cache, 8, plan.slots)
        write_tree_rows(output, tree_attention_batched(query, k, v, plan, 0.3, window), plan)
        paged_tree_attention_chunked(query, output, lambda s: paged_kv_rows(cache, 8, s), plan, 0.3,
                                     window, max_kv_elements=1)  # one request per group
    assert len(plan._masks) == 1
    src = torch.zeros(6, dtype=torch.long, device="meta")
    move_paged_kv_rows(cache, src, src.clone())


def test_planned_write_equals_boolean_write():
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(32, generator=g)[:32].view(4, 8).int()
    plan = plan_tree_attention(table, 16, *_host_inputs())
    E, Q = plan.query_rows.shape
    out = torch.randn(E, Q, 4, 8, generator=g)
    planned, boolean = torch.zeros(20, 4, 8), torch.zeros(20, 4, 8)
    write_tree_rows(planned, out, plan)
    write_tree_rows(boolean, out, dataclasses.replace(plan, write_rows=None, write_src=None))
    assert torch.equal(planned, boolean)
    assert planned.abs().sum() > 0
