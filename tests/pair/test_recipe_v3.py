"""Recipe v3 of the tiny-pair training script, in small pieces: the engine-like acceptance (the chain
process vLLM runs), the greedy-chain label mask of teacher-forced real text, the masked loss, and
that drafting every anchor in one forward equals drafting them one at a time (what the engine does).
CPU, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import train_tiny_pair as ttp  # noqa: E402

BS1 = ttp.BLOCK_SIZE - 1


def test_chain_walk_hand_made():
    # 10 tokens to produce; the prefill makes token 0, drafts are anchored at the last token made
    m = [2, 9, 9, 0, 9, 9, 9, 1, 9, 9]
    steps, per_pos = ttp.chain_walk(m, 10)
    # anchor 0 accepts 2 (+bonus) -> tokens 0..3, anchor 3 accepts 0 -> token 4, anchor 4 accepts 9
    # -> 14 tokens made: done. Anchors 1, 2, 5.. are never drafted at.
    assert steps == 3
    assert per_pos == [2, 2] + [1] * 7 + [0] * 6
    assert 1 + sum(per_pos) / steps == pytest.approx(1 + 11 / 3)
    # a drafter that never matches: one step per token after the prefill's
    steps, per_pos = ttp.chain_walk([0] * 64, 64)
    assert steps == 63 and sum(per_pos) == 0
    # a perfect drafter: 15 + bonus per step
    steps, per_pos = ttp.chain_walk([15] * 64, 64)
    assert steps == 4 and per_pos == [4] * 15  # tokens 1, 17, 33, 49 start the steps
    assert ttp.chain_walk([3], 1) == (0, [0] * 15)  # the prefill's token alone: no draft step


def test_chain_walk_rejects_bad_input():
    with pytest.raises(ValueError, match="new_tokens"):
        ttp.chain_walk([1, 2], 0)
    with pytest.raises(ValueError, match="outside"):
        ttp.chain_walk([16, 0, 0], 3)
    with pytest.raises(ValueError, match="anchors"):
        ttp.chain_walk([0], 5)


def test_leading_matches_and_label_validity():
    import torch

    truth = torch.arange(BS1)[None].repeat(3, 1)
    drafts = truth.clone()
    drafts[0, 0] = 99          # wrong at position 1: nothing accepted
    drafts[1, 4] = 99          # right at 1..4
    matches = ttp.leading_matches(drafts, truth)
    assert matches.tolist() == [0, 4, BS1]

    labels = torch.tensor([[5, 6, 7, 8] + [0] * (BS1 - 4)])
    seq_next = torch.tensor([[5, 6, 1, 8] + [0] * (BS1 - 4)])  # real text leaves the chain at k = 3
    valid = ttp.label_validity(seq_next, labels)[0].tolist()
    # k = 1, 2 follow real tokens that equal the argmax; k = 3 still has a valid label (the argmax
    # given tokens that are on the chain); k = 4 follows the off-chain token 1 -> no label from here
    assert valid[:4] == [True, True, True, False] and not any(valid[4:])
    seq_next[0, 0] = 0  # off the chain right after the anchor: only position 1 counts
    valid = ttp.label_validity(seq_next, labels)[0].tolist()
    assert valid == [True] + [False] * (BS1 - 1)


def test_masked_distill_loss_counts_only_valid_positions():
    import torch

    g = torch.Generator().manual_seed(0)
    d_logits = torch.randn(2, 3, BS1, 50, generator=g)
    t_lp = torch.log_softmax(torch.randn(2, 3, BS1, 4, generator=g), -1)
    t_ix = torch.randint(0, 50, (2, 3, BS1, 4), generator=g)
    pos_w = torch.rand(BS1, generator=g) + 0.5
    valid = torch.zeros(2, 3, BS1, dtype=torch.bool)
    valid[..., 0] = True
    valid[0, 1, :5] = True
    loss, w = ttp.distill_loss_terms(d_logits, t_lp, t_ix, valid, pos_w)
    # changing the logits or labels where the mask is off changes nothing
    d2, ix2 = d_logits.clone(), t_ix.clone()
    d2[~valid] = torch.randn(int((~valid).sum()), 50, generator=g)
    ix2[~valid] = torch.randint(0, 50, (int((~valid).sum()), 4), generator=g)
    loss2, w2 = ttp.distill_loss_terms(d2, t_lp, ix2, valid, pos_w)
    assert torch.allclose(loss, loss2) and torch.allclose(w, w2)
    assert w == pytest.approx(float((pos_w * valid).sum()))
    # and a valid position does count
    d2[0, 0, 0] += 5 * torch.randn(50, generator=g)
    loss3, _ = ttp.distill_loss_terms(d2, t_lp, ix2, valid, pos_w)
    assert not torch.allclose(loss, loss3)


def test_split_batch():
    assert ttp.split_batch(32, 0.5, True, True) == (16, 16)
    assert ttp.split_batch(32, 0.0, False, True) == (0, 32)
    assert ttp.split_batch(32, 0.5, True, False) == (32, 0)
    assert ttp.split_batch(2, 0.9, True, True) == (1, 1)  # both sources keep a row


def _tiny_pair():
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    torch.manual_seed(0)
    tcfg = ttp.target_text_config(ttp.SMOKE_DIMS, 128, 0)
    tcfg._attn_implementation = "sdpa"
    target = Qwen3_5ForCausalLM(tcfg).eval()
    drafter = ttp.build_drafter_class()(ttp.drafter_cfg(tcfg, 2, len(ttp.SMOKE_LAYER_IDS))).eval()
    # random init has unit RMSNorm weights and small projections; make drafts depend on context
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(3.0)
    return target, drafter


def test_all_anchors_in_one_forward_equal_one_anchor_at_a_time():
    """engine_like_acceptance drafts at every generated token in one drafter forward; the engine
    drafts at one anchor with only the context before it. The block mask must make them equal."""
    import torch

    target, drafter = _tiny_pair()
    tap = ttp.LayerTap(target.model.layers, ttp.SMOKE_LAYER_IDS)
    seq = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    mask_id = 1
    with torch.no_grad():
        target(input_ids=seq)
        aux = tap.features()
        anchors = torch.arange(20, 36)[None]
        block = torch.full((1, 16, ttp.BLOCK_SIZE), mask_id)
        block[0, :, 0] = seq[0, 20:36]
        all_at_once = drafter(aux, anchors, block, target.model.embed_tokens)
        for j, a in enumerate(range(20, 36)):
            one = drafter(aux[:, :a], torch.tensor([[a]]), block[:, j:j + 1],
                          target.model.embed_tokens)
            torch.testing.assert_close(all_at_once[:, j], one[:, 0], rtol=1e-4, atol=1e-4)


def test_engine_like_acceptance_with_an_oracle_drafter():
    """Wrap the drafter so it outputs the target's own greedy tokens at draft positions 1..m(a): the
    chain must then accept exactly m(a) at every anchor it visits."""
    import torch

    target, drafter = _tiny_pair()
    tap = ttp.LayerTap(target.model.layers, ttp.SMOKE_LAYER_IDS)
    prompt = torch.randint(2, 128, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    new_tokens = 20
    seq = ttp.greedy_continue(target, torch.tensor([prompt]), new_tokens + ttp.BLOCK_SIZE,
                              torch.device("cpu"))[0]
    m_at = [(3 * a) % 7 for a in range(new_tokens)]  # how many drafts the oracle gets right
    emb = target.model.embed_tokens.weight
    head = target.lm_head.weight
    # the oracle's trick below needs every LM-head row to score highest against itself
    assert ((head @ head.T).argmax(-1) == torch.arange(head.shape[0])).all()

    class Oracle(torch.nn.Module):
        """Hidden states whose LM-head argmax is the target's greedy token for the first m(a) draft
        positions and a wrong token after that."""

        def forward(self, aux, anchors, block_tokens, embed):
            n = anchors.shape[1]
            out = torch.zeros(1, n, ttp.BLOCK_SIZE, emb.shape[1])
            for j, a in enumerate(anchors[0].tolist()):
                rel = a - len(prompt)
                for k in range(1, ttp.BLOCK_SIZE):
                    true = int(seq[a + k])
                    tok = true if k <= m_at[rel] else (true + 1) % 128
                    out[0, j, k] = head[tok] * 100.0  # argmax(head @ h) = tok for a random head
            return out

    res = ttp.engine_like_acceptance(target, tap, Oracle(), [prompt], new_tokens, 1,
                                     torch.device("cpu"))
    steps, per_pos = ttp.chain_walk(m_at, new_tokens)
    assert res["drafts"] == steps and res["accepted_per_position"] == per_pos
    assert res["acceptance_length"] == pytest.approx(round(1 + sum(per_pos) / steps, 3))


def test_file_start_prompts_is_the_vllm_measurement_selection(tmp_path):
    """measure_tiny_pair.heldout_prompts (what vLLM is measured on) and the training script's
    engine-like acceptance pick the same prompts."""
    pytest.importorskip("tokenizers")
    import measure_tiny_pair as mtp

    tok_json = REPO / "models" / "tiny-pair" / "target" / "tokenizer.json"
    from tokenizers import Tokenizer

    import sysconfig

    tok = Tokenizer.from_file(str(tok_json))
    _, held = ttp.split_corpus(Path(sysconfig.get_paths()["stdlib"]))
    ours = ttp.file_start_prompts(lambda t: tok.encode(t).ids, held, 3)
    assert ours == mtp.heldout_prompts(tok_json, 3)
    assert [len(p) for p in ours] == [48, 85, 122]
    with pytest.raises(ValueError, match="long enough"):
        ttp.file_start_prompts(lambda t: tok.encode(t).ids, held[:2], 5)
