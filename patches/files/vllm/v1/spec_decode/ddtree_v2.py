# ddtree-vllm overlay module (copied into vllm/v1/spec_decode/ddtree_v2.py by scripts/apply_overlays.py)
"""DDTree tree verify in vLLM 0.26's V2 model runner (``vllm/v1/worker/gpu/``).

The V1 glue (``vllm/v1/spec_decode/ddtree.py``) does the work; this module adapts it to the V2
runner's persistent buffers (see docs/ddtree-v2-runner.md for the mapping):

- ``DDTreeSpeculator`` (a ``DFlashSpeculator``): the drafter runs ``ddtree_max_depth`` query
  positions per request (its own CUDA graphs capture that width) and keeps the sampled rows' hidden
  states in a static buffer; the tree is built eagerly from their logits after the graph, and the
  speculator returns ``budget`` draft tokens per request (the tree's node tokens in flattened order),
  which the runner writes into its draft-token buffer as for a chain.
- ``DDTreeV2RunnerState`` (a ``DDTreeRunnerState``): ``on_positions`` after the V2 slot mappings
  (tree positions, the step's ``TreeVerifyStep`` for the attention / GDN hooks, which are the same
  as V1's); ``on_model_inputs`` for M-RoPE positions; ``sample`` instead of the rejection sampler
  (target tokens from V2's own sampler, the tree walk, the commit of the V1 glue, the V2
  ``SamplerOutput`` with ``num_sampled = accepted + 1``); ``drafter_inputs`` before the drafter:
  the accepted path's hidden-state rows and chain positions laid out first in each block, so the
  V2 DFlash input kernel, which keeps the first ``num_sampled`` rows of each block, sees the path.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.spec_decode.ddtree import (DDTreeRunnerState, TreeEntry, TreeVerifyStep, _set_current,
                                        _test_draft_hook, current_tree_step, needs_vllm_sampler,
                                        restrict_trees)
from vllm.v1.worker.gpu.spec_decode.dflash.speculator import DFlashSpeculator

logger = init_logger(__name__)


def attach_ddtree_v2(runner) -> None:
    """Called by the V2 runner right after it built its speculator."""
    spec = getattr(runner, "speculator", None)
    if isinstance(spec, DDTreeSpeculator):
        runner._ddtree = DDTreeV2RunnerState(runner)
        spec.ddtree_state = runner._ddtree


# ----------------------------------------------------------------------------- speculator


def tree_roots(num_sampled: torch.Tensor, last_sampled: torch.Tensor,
               next_prefill_tokens: torch.Tensor, idx_mapping: torch.Tensor,
               num_reqs: int) -> torch.Tensor:
    """The root token of each request's next tree, ``[num_reqs]`` long: the last committed token,
    or for a request still in prefill (nothing sampled) the next prompt token.

    V2's request state keeps the last sampled token as a ``[max_num_reqs, 1]`` column
    (``RequestState.last_sampled_tokens``) but the next prefill token as ``[max_num_reqs]``:
    indexing both by the batch's state rows and mixing them in ``torch.where`` would broadcast
    to ``[num_reqs, num_reqs]``, so the column is taken explicitly. A last-sampled buffer of any
    other layout is refused here rather than guessed at."""
    if last_sampled.dim() == 2 and last_sampled.shape[1] == 1:
        last_sampled = last_sampled[:, 0]
    elif last_sampled.dim() != 1:
        raise ValueError(f"last_sampled: expected a [max_num_reqs] or [max_num_reqs, 1] tensor, "
                         f"got {tuple(last_sampled.shape)}")
    if next_prefill_tokens.dim() != 1:
        raise ValueError(f"next_prefill_tokens: expected a [max_num_reqs] tensor, "
                         f"got {tuple(next_prefill_tokens.shape)}")
    idx = idx_mapping[:num_reqs].long()
    return torch.where(num_sampled[:num_reqs] > 0, last_sampled[idx].long(),
                       next_prefill_tokens[idx].long())


def gdn_spec_draft_counts(input_batch) -> np.ndarray | None:
    """Per batch row, the draft count V2 hands vLLM's GDN metadata builder (-1: not a spec row),
    computed on the host as ``MambaHybridModelState.prepare_attn`` does: a row is a spec-decode
    row when it has drafts and exactly one non-draft token is scheduled."""
    num_draft = getattr(input_batch, "num_draft_tokens_per_req", None)
    if num_draft is None:
        return None
    num_reqs = input_batch.num_reqs
    num_draft = np.asarray(num_draft[:num_reqs], dtype=np.int64)
    scheduled = np.asarray(input_batch.num_scheduled_tokens[:num_reqs], dtype=np.int64)
    return np.where((num_draft > 0) & (scheduled == num_draft + 1), num_draft, -1)


class DDTreeSpeculator(DFlashSpeculator):
    """DFlash drafter pass (``ddtree_max_depth`` positions) -> a draft tree per request."""

    _speculator_name = "DDTree"

    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        sc = vllm_config.speculative_config
        self.ddtree_budget = int(sc.ddtree_budget)
        self.ddtree_top_k = int(sc.ddtree_top_k)
        self.ddtree_chain_seed = bool(sc.ddtree_chain_seed)
        self._resize_for_depth(int(sc.ddtree_max_depth), self.draft_model_config.get_hidden_size())
        self.ddtree_state: DDTreeV2RunnerState | None = None
        self.last_trees = None
        self.last_build_s = 0.0

    def _resize_for_depth(self, depth: int, hidden_size: int) -> None:
        """The runner schedules `budget` drafts per request (num_speculative_tokens = budget); the
        drafter itself proposes `depth` <= budget positions: resize what DFlash sized by the former
        (the flat sample buffers, sized by the budget, are large enough)."""
        if not 1 <= depth <= self.num_speculative_steps:
            raise ValueError(f"ddtree_max_depth: expected 1..{self.num_speculative_steps}, got {depth}")
        device = self.device
        self.num_speculative_steps = depth
        self.num_query_per_req = 1 + depth
        self.draft_tokens = torch.zeros(self.max_num_reqs, depth, dtype=torch.int64, device=device)
        if self.draft_logits is not None:
            self.draft_logits = torch.zeros(self.max_num_reqs, depth, self.vocab_size,
                                            dtype=torch.float32, device=device)
        self.sample_col = torch.arange(depth, dtype=torch.int32, device=device).repeat(self.max_num_reqs)
        # Hidden states of the sampled rows, written inside the drafter's graph (static address);
        # the logits for the tree are computed after it.
        self.tree_hidden = torch.zeros(self.max_num_reqs * depth, hidden_size, dtype=self.dtype,
                                       device=device)

    def _generate_draft(self, num_reqs, num_tokens_padded, attn_metadata, slot_mappings,
                        num_tokens_across_dp, cudagraph_runtime_mode=None):
        from vllm.config.compilation import CUDAGraphMode

        last_hidden_states = self._run_model(
            num_tokens_padded, attn_metadata, slot_mappings, num_tokens_across_dp,
            cudagraph_runtime_mode if cudagraph_runtime_mode is not None else CUDAGraphMode.NONE)
        num_sample = num_reqs * self.num_speculative_steps
        self.tree_hidden[:num_sample] = last_hidden_states[self.sample_indices[:num_sample]]

    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states,
                aux_hidden_states, num_sampled, num_rejected, last_sampled, next_prefill_tokens,
                temperature, seeds, num_tokens_across_dp=None, dummy_run=False,
                skip_attn_for_dummy_run=False, mm_inputs=None, is_profile=False):
        from ddtree.tree import build_tree

        super().propose(input_batch, attn_metadata, slot_mappings, last_hidden_states,
                        aux_hidden_states, num_sampled, num_rejected, last_sampled,
                        next_prefill_tokens, temperature, seeds,
                        num_tokens_across_dp=num_tokens_across_dp, dummy_run=dummy_run,
                        skip_attn_for_dummy_run=skip_attn_for_dummy_run, mm_inputs=mm_inputs,
                        is_profile=is_profile)
        num_reqs = input_batch.num_reqs
        if dummy_run:
            return torch.zeros(num_reqs, self.ddtree_budget, dtype=torch.int64, device=self.device)
        t0 = time.perf_counter()
        depth = self.num_speculative_steps
        logits = self.model.compute_logits(self.tree_hidden[: num_reqs * depth])
        logits = logits.view(num_reqs, depth, -1).float()
        roots = tree_roots(num_sampled, last_sampled, next_prefill_tokens,
                           input_batch.idx_mapping, num_reqs)
        state = self.ddtree_state
        hook = _test_draft_hook()
        if hook is not None and state is not None:
            logits = state.apply_test_hook(hook, logits, input_batch, roots)
        trees = build_tree(root_token_ids=roots, budget=self.ddtree_budget, top_k=self.ddtree_top_k,
                           draft_logits=logits, chain_seed=self.ddtree_chain_seed)
        if state is not None:
            req_ids = list(input_batch.req_ids[:num_reqs])
            restrict_trees(trees, roots, logits, self.ddtree_budget,
                           state.vllm_sampler_rows(req_ids), state.structured_output_rows(req_ids))
        self.last_trees = trees
        self.last_build_s = time.perf_counter() - t0
        if state is not None:
            state.after_propose(self, list(input_batch.req_ids[:num_reqs]))
        tokens = trees.token_ids[:, 1:]
        # padding slots must still be valid token ids for the embedding; they are never accepted
        return torch.where(tokens >= 0, tokens, roots[:, None].expand_as(tokens)).to(torch.int64)


# ----------------------------------------------------------------------------- runner state


class DDTreeV2RunnerState(DDTreeRunnerState):
    """Tree bookkeeping owned by one V2 GPUModelRunner (``vllm/v1/worker/gpu/model_runner.py``)."""

    def __init__(self, runner) -> None:
        super().__init__(runner)
        self.params: dict[str, object] = {}  # req_id -> SamplingParams (V2 keeps no request objects)
        self._warned_stale = False

    # -- bookkeeping ---------------------------------------------------------------------------
    def _track_params(self, scheduler_output) -> None:
        for attr in ("finished_req_ids", "preempted_req_ids"):
            for req_id in getattr(scheduler_output, attr, None) or ():
                self.params.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:  # resumed requests come back as new here
            self.params[new.req_id] = new.sampling_params
        live = getattr(getattr(self.runner, "req_states", None), "req_id_to_index", None)
        if live is not None and len(self.params) > len(live):
            # Requests finished in a step that scheduled no tokens (the start-up warm-up's clean-up,
            # or the engine going idle) never reach this hook: V2's execute_model returns before
            # it. Drop them once the runner no longer holds them, or the dict grows forever.
            for req_id in [r for r in self.params if r not in live]:
                del self.params[req_id]

    def vllm_sampler_rows(self, req_ids: list[str]) -> list[int]:
        return [i for i, rid in enumerate(req_ids) if needs_vllm_sampler(self.params.get(rid))]

    def structured_output_rows(self, req_ids: list[str]) -> list[int]:
        return [i for i, rid in enumerate(req_ids)
                if getattr(self.params.get(rid), "structured_outputs", None) is not None]

    def apply_test_hook(self, hook, logits: torch.Tensor, input_batch, roots: torch.Tensor):
        """Tests only (``DDTREE_TEST_DRAFT_HOOK``): replace the drafter's logits per request given
        its committed tokens, root included (V2 keeps them in ``req_states.all_token_ids``)."""
        rs = self.runner.req_states
        out = logits.clone()
        idx = input_batch.idx_mapping[: logits.shape[0]].long()
        total = rs.total_len.gpu[idx].cpu().tolist()
        for i in range(logits.shape[0]):
            history = rs.all_token_ids.gpu[int(idx[i]), : int(total[i])].tolist()
            if not history or history[-1] != int(roots[i]):
                history.append(int(roots[i]))  # a prefill chunk: the root is the next prompt token
            repl = hook(history, logits.shape[1], logits.shape[2])
            if repl is not None:
                out[i] = repl.to(out.dtype)
        return out

    # -- step 2: positions and masks (after the V2 slot mappings) --------------------------------
    def on_positions(self, scheduler_output, input_batch) -> None:  # noqa: D401 (V2 signature)
        from ddtree.transfer import to_device
        from ddtree.tree import ancestor_mask_from_parents
        from ddtree.tree.verify_index import tree_positions

        runner = self.runner
        self.last_entries = []
        self.last_walk = None
        _set_current(None)
        self._track_params(scheduler_output)
        self._forget_trees(scheduler_output)
        spec = scheduler_output.scheduled_spec_decode_tokens
        if not spec:
            return
        row_of = {rid: i for i, rid in enumerate(input_batch.req_ids)}
        picked = []
        for req_id, drafts in spec.items():
            tree = self.trees.get(req_id)
            i = row_of.get(req_id)
            if tree is None or i is None or not drafts or not tree.proposed(drafts):
                continue
            q = int(input_batch.num_scheduled_tokens[i])
            if q != len(drafts) + 1 or bool(input_batch.is_prefilling_np[i]):
                continue  # not a pure verify block (e.g. chunked): the chain path verifies it
            picked.append((i, int(input_batch.query_start_loc_np[i]), q,
                           int(input_batch.num_computed_tokens_np[i]), tree))
        if not picked:
            return
        picked = self._drop_stale(picked, input_batch)
        if not picked:
            return
        E, Q = len(picked), self.budget + 1
        parents = torch.full((E, Q), -1, dtype=torch.long)
        depths = torch.zeros((E, Q), dtype=torch.long)
        for e, (_, _, q, _, tree) in enumerate(picked):
            n = min(tree.num_nodes, q)
            parents[e, :n] = tree.parents[:n]  # padding nodes stay isolated (-1)
            depths[e, :q] = tree.depths[:q]
        rows = torch.tensor([p[0] for p in picked])
        starts = torch.tensor([p[1] for p in picked])
        q_lens = torch.tensor([p[2] for p in picked])
        prefix = torch.tensor([p[3] for p in picked])
        visible = ancestor_mask_from_parents(parents, int(depths.max()))
        token, pos = tree_positions(starts, q_lens, prefix, depths)
        positions = input_batch.positions
        positions[to_device(token, positions.device)] = to_device(pos, positions.device, positions.dtype)
        entries = [TreeEntry(int(rows[e]), int(starts[e]), int(q_lens[e]), int(prefix[e]),
                             parents[e, : int(q_lens[e])], min(picked[e][4].num_nodes, int(q_lens[e])),
                             visible[e, : int(q_lens[e]), : int(q_lens[e])], depths[e, : int(q_lens[e])])
                   for e in range(E)]
        self.last_entries = entries
        # The shared GDN hook reads the trees' parents and node counts from the step (a step
        # without them failed the first tree verify on CUDA, which was V2's start-up warm-up), and
        # the spec rows of vLLM's GDN metadata from host counts (no device read per step).
        num_reqs = input_batch.num_reqs
        num_scheduled = np.asarray(input_batch.num_scheduled_tokens[:num_reqs], dtype=np.int64).copy()
        step = TreeVerifyStep(entries, {e.req_index: e for e in entries}, rows=rows, starts=starts,
                              prefix_lens=prefix, q_lens=q_lens, visible=visible, depths=depths,
                              parents=parents,
                              num_nodes=torch.tensor([e.num_nodes for e in entries], dtype=torch.long),
                              num_scheduled=num_scheduled,
                              spec_draft_counts=gdn_spec_draft_counts(input_batch),
                              runner=runner)
        step.group_block_table = self._group_block_table(input_batch.num_reqs)
        _set_current(step)

    def _drop_stale(self, picked, input_batch):
        """The V2 runner reads a block's drafts from its GPU draft buffer, not from the scheduler
        (which only sees placeholders): keep a tree only if the block's tokens are its nodes."""
        idx = torch.cat([torch.arange(s + 1, s + min(t.num_nodes, q)) for _, s, q, _, t in picked])
        got = input_batch.input_ids[idx.to(input_batch.input_ids.device)].cpu().tolist() if idx.numel() else []
        keep, k = [], 0
        for p in picked:
            _, _, q, _, tree = p
            n = min(tree.num_nodes, q) - 1
            want = tree.token_ids[1: 1 + n].tolist() if tree.token_ids is not None else got[k: k + n]
            if got[k: k + n] == want:
                keep.append(p)
            elif not self._warned_stale:
                self._warned_stale = True
                logger.warning("DDTree (V2 runner): a block's drafts are not its tree's nodes; "
                               "verifying it as a chain")
            k += n
        return keep

    def _group_block_table(self, num_reqs: int):
        """Block table of a KV-cache group in batch order (V2: gathered per step)."""
        tables = self.runner.block_tables.input_block_tables
        return lambda gid: tables[gid][:num_reqs]

    def on_model_inputs(self, model_inputs: dict) -> None:
        """M-RoPE targets: V2's rope state replaces the positions with [3, T] text positions; a
        tree node's triple is its root's advanced by the node's depth."""
        step = current_tree_step()
        pos = model_inputs.get("positions")
        if step is None or pos is None or pos.dim() != 2:
            return
        from ddtree.transfer import to_device
        from ddtree.tree.verify_index import tree_positions

        token, depth = tree_positions(step.starts, step.q_lens, torch.zeros_like(step.prefix_lens),
                                      step.depths)
        root = torch.repeat_interleave(step.starts, step.q_lens)
        dev = pos.device
        pos[:, to_device(token, dev)] = pos[:, to_device(root, dev)] + to_device(depth, dev, pos.dtype)[None, :]

    # -- step 4: sample, walk and commit -----------------------------------------------------
    def sample(self, logits: torch.Tensor, input_batch):  # noqa: D401 (V2 signature)
        """Replaces V2's rejection sampler for a batch with drafts; returns V2's SamplerOutput."""
        from ddtree.transfer import to_device
        from ddtree.tree import DraftTree, tree_walk
        from ddtree.tree.verify_index import path_gather_index, verify_walk_arrays
        from vllm.v1.worker.gpu.input_batch import get_num_sampled_and_rejected
        from vllm.v1.worker.gpu.sample.output import SamplerOutput as V2SamplerOutput

        t0 = time.perf_counter()
        runner = self.runner
        sampler = runner.sampler
        step = current_tree_step()
        num_reqs = input_batch.num_reqs
        n = self.budget + 1
        dev = logits.device
        # The target's token at every row: V2's own sampler (temperature, top-k/p, seeded Gumbel
        # noise keyed by position: a node at depth d is keyed like the target alone at that
        # position). Penalty-type processing sees drafts as history, which is only right at the
        # root: such requests have root-only trees (restrict_trees).
        draft_sampled = input_batch.input_ids[input_batch.logits_indices]
        pos = input_batch.positions[input_batch.logits_indices]
        want_lp = sampler.returns_logprobs(input_batch.idx_mapping_np)
        target_rows, processed = sampler.sample(
            logits, input_batch.expanded_idx_mapping, input_batch.idx_mapping_np, pos, draft_sampled,
            input_batch.expanded_local_pos, return_logprobs=want_lp)
        num_draft = torch.from_numpy(np.asarray(input_batch.num_draft_tokens_per_req[:num_reqs],
                                                dtype=np.int64))
        cu = torch.from_numpy(np.asarray(input_batch.cu_num_logits_np[: num_reqs + 1], dtype=np.int64))
        # the drafts are the non-root rows of every block
        is_draft = torch.ones(int(cu[-1]), dtype=torch.bool)
        is_draft[cu[:-1]] = False
        drafts = draft_sampled.cpu()[is_draft]
        entries = step.entries if step is not None else []
        tr = torch.tensor([e.req_index for e in entries], dtype=torch.long)
        tpar = torch.full((len(entries), n), -1, dtype=torch.long)
        tdep = torch.zeros((len(entries), n), dtype=torch.long)
        for k, e in enumerate(entries):
            tpar[k, : e.q_len] = e.parents
            tdep[k, : e.q_len] = e.depths
        tnn = torch.tensor([e.num_nodes for e in entries], dtype=torch.long)
        arrays = verify_walk_arrays(num_draft, cu, n, drafts, tr, tpar, tdep, tnn)
        depths = arrays["depths"]
        # the walk's host arrays in one non-blocking copy
        packed = to_device(torch.stack([arrays[k].long().view(num_reqs, n) for k in
                                        ("token_ids", "parents", "depths", "valid", "rows")]), dev)
        tokens_d, parents_d, depths_d, valid_d, rows_d = packed.unbind(0)
        valid_d = valid_d.bool()
        tree = DraftTree(token_ids=tokens_d, parents=parents_d, depths=depths_d,
                         ranks=torch.zeros_like(depths_d),
                         scores=torch.zeros((num_reqs, n), dtype=torch.float32, device=dev),
                         num_nodes=valid_d.sum(1), valid=valid_d,
                         max_depth=max(int(depths.max()) if depths.numel() else 0, 1), top_k=1)
        target = target_rows.view(-1)[rows_d.flatten()].view(num_reqs, n)
        walk = tree_walk(tree, target)
        committed = walk.committed_token_ids
        out = torch.zeros((num_reqs, n), dtype=torch.int64, device=dev)
        width = min(committed.shape[1], n)
        out[:, :width] = committed[:, :width].clamp(min=0)
        num_sampled = (walk.num_accepted + 1).to(torch.int32)
        num_sampled, num_rejected = get_num_sampled_and_rejected(
            num_sampled, input_batch.seq_lens, input_batch.cu_num_logits, input_batch.idx_mapping,
            sampler.req_states.prefill_len.gpu)
        logprobs = None
        rs = getattr(runner, "rejection_sampler", None)
        if want_lp and rs is not None:
            # Committed token j was predicted by the row of accepted node j - 1: lay the rows out
            # along the path, then vLLM's chain logprobs code reads them in order.
            lay = path_gather_index(logits.shape[0], to_device(torch.from_numpy(
                np.asarray(input_batch.cu_num_logits_np[:num_reqs], dtype=np.int64)), dev),
                walk.accepted_nodes, walk.num_accepted)
            src = processed if sampler.logprobs_mode in ("processed_logprobs", "processed_logits") else logits
            logprobs = rs._get_logprobs_tensors(input_batch, out, num_sampled, src[lay])
        self._finish_verify(step, walk, num_draft.tolist(), t0)
        return V2SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs, num_nans=None,
                               num_sampled=num_sampled, num_rejected=num_rejected)

    # -- step 5: drafter inputs along the accepted path ----------------------------------------
    def drafter_inputs(self, input_batch, hidden_states, aux_hidden_states) -> None:
        """Before the V2 drafter: in every tree block, the accepted path's hidden-state rows move to
        the block's first rows and the block's positions become chain positions (prefix + j). The
        V2 DFlash input kernel keeps the first ``num_sampled`` rows of each block as context, at
        their positions, exactly as after a chain verify."""
        from ddtree.transfer import list_to_device, to_device
        from ddtree.tree.verify_index import chain_positions, moved_rows, path_gather_index

        entries, walk = self.last_entries, self.last_walk
        if not entries or walk is None:
            return
        dev = input_batch.positions.device
        rows = list_to_device([e.req_index for e in entries], walk.accepted_nodes.device)
        starts = torch.tensor([e.start for e in entries])
        q_lens = torch.tensor([e.q_len for e in entries])
        prefix = torch.tensor([e.prefix_len for e in entries])
        lay = path_gather_index(input_batch.num_tokens, starts, walk.accepted_nodes[rows],
                                walk.num_accepted[rows])
        src, dst = moved_rows(lay)
        if dst.numel():
            for h in [hidden_states, *(aux_hidden_states or [])]:
                if h is not None:
                    h[dst.to(h.device)] = h[src.to(h.device)]
        token, pos = chain_positions(starts, q_lens, prefix)
        input_batch.positions[to_device(token, dev)] = to_device(pos, dev, input_batch.positions.dtype)
        self.last_entries = []
