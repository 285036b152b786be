"""Host stand-ins for the pieces of vLLM's V2 model runner that the DDTree V2 glue touches, so its
tests run on the CPU wheel (V2 itself needs CUDA + Triton). Shared by tests/e2e/test_ddtree_v2_*.

Only torch here; the test passes in vLLM's modules (``states``) and our speculator class, which it
imports behind ``pytest.importorskip``."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class HostTensor:
    """Stands in for V2's StagedWriteTensor / UvaBackedTensor (pinned memory needs CUDA)."""

    def __init__(self, size, dtype, *args, **kwargs):
        self.gpu = torch.zeros(size, dtype=dtype)
        self.cpu = self.gpu
        self.np = self.cpu.numpy()


def host_request_state(states, monkeypatch, max_num_reqs: int, budget: int, vocab: int):
    """vLLM's own V2 ``RequestState`` (so a change of its buffer layout shows up in the tests),
    its pinned / UVA buffers replaced by ``HostTensor``."""
    monkeypatch.setattr(states, "StagedWriteTensor", HostTensor)
    monkeypatch.setattr(states, "UvaBackedTensor", HostTensor)
    return states.RequestState(max_num_reqs, 64, 256, budget, vocab, torch.device("cpu"))


def num_sampled_and_rejected(num_sampled, seq_lens, cu_num_logits, idx_mapping, prefill_len):
    """Torch form of V2's Triton ``get_num_sampled_and_rejected`` (chunked prefills sample nothing)."""
    n = idx_mapping.shape[0]
    chunked = seq_lens[:n] < prefill_len[idx_mapping.long()]
    num_logits = (cu_num_logits[1: n + 1] - cu_num_logits[:n]).to(num_sampled.dtype)
    ns = torch.where(chunked, torch.zeros_like(num_sampled), num_sampled)
    return ns, torch.where(chunked, torch.zeros_like(num_sampled), num_logits - ns)


class GreedySampler:
    """V2's ``Sampler.sample`` for greedy targets: argmax, logits returned as they are."""
    logprobs_mode = "raw_logprobs"

    def __init__(self, prefill_len):
        self.req_states = SimpleNamespace(prefill_len=SimpleNamespace(gpu=prefill_len))

    def returns_logprobs(self, idx_mapping_np):
        return False

    def sample(self, logits, expanded_idx_mapping, idx_mapping_np, pos, input_ids, expanded_local_pos,
               return_logprobs=False):
        return logits.argmax(-1), logits


class RandomHead:
    """The drafter's LM head: a fixed random projection of the sampled rows' hidden states."""

    def __init__(self, seed: int, hidden: int, vocab: int):
        self.w = torch.randn(hidden, vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def compute_logits(self, hidden):
        return hidden @ self.w


def bare_speculator(speculator_cls, *, max_num_reqs: int, budget: int, depth: int, top_k: int,
                    vocab: int, hidden: int, seed: int, random_hidden: bool):
    """A ``DDTreeSpeculator`` without its drafter model: sized as DFlash sizes it
    (num_speculative_tokens = budget), resized to ``depth``, a ``RandomHead`` as its model.
    ``random_hidden``: fill ``tree_hidden`` (what the stubbed drafter pass would have written) with
    seeded random rows, else leave the zeros ``_resize_for_depth`` made."""
    spec = speculator_cls.__new__(speculator_cls)
    spec.device, spec.dtype, spec.max_num_reqs, spec.vocab_size = (
        torch.device("cpu"), torch.float32, max_num_reqs, vocab)
    spec.num_speculative_steps = budget
    spec.draft_logits = None
    spec._resize_for_depth(depth, hidden)
    spec.ddtree_budget, spec.ddtree_top_k, spec.ddtree_chain_seed = budget, top_k, True
    spec.ddtree_state, spec.last_trees, spec.last_build_s = None, None, 0.0
    spec.model = RandomHead(seed, hidden, vocab)
    if random_hidden:
        spec.tree_hidden.copy_(torch.randn(spec.tree_hidden.shape,
                                           generator=torch.Generator().manual_seed(seed)))
    return spec
