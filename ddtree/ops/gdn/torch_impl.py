"""Vectorised torch implementations of the tree GDN ops (the CPU path; also runs on CUDA).

Same contract as the Triton kernels (see docs/tree-gdn.md). The recurrence walks the nodes in
index order over the whole batch at once, gathering parent states from the slot pool exactly where
the Triton kernel reloads them, so the two paths round identically with bf16 slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ancestor_sources(parents: torch.Tensor, num_nodes: torch.Tensor, width: int):
    """For every node and every window position j = 0..W-1 (j steps back from the node): an index
    into [history rows 0..W-2, node rows W-1..W-2+N]. Returns [B, N, W] int64."""
    B, N = parents.shape
    dev = parents.device
    par = parents.long().clamp(min=-1, max=N - 1)
    cur = torch.arange(N, device=dev).expand(B, N).clone()
    hist_row = torch.full((B, N), width - 1, dtype=torch.long, device=dev)
    cols = [cur + (width - 1)]
    for _ in range(1, width):
        up = par.gather(1, cur.clamp(min=0))
        cur = torch.where(cur >= 0, up, cur)
        hist_row = torch.where(cur >= 0, hist_row, hist_row - 1)
        cols.append(torch.where(cur >= 0, cur + (width - 1), hist_row))
    return torch.stack(cols, dim=2)


def tree_conv1d_update_torch(x, weight, bias, conv_state, conv_state_indices, conv_state_offsets,
                             parents, num_nodes, out, silu, stage_inputs):
    B, N = parents.shape
    D, W = weight.shape
    dev = x.device
    lines = conv_state_indices.long()
    active = num_nodes.long() > 0
    safe_lines = torch.where(active, lines, torch.zeros_like(lines))
    line_vals = conv_state[safe_lines]  # [B, D, S] copy
    off = (conv_state_offsets.long() if conv_state_offsets is not None
           else torch.zeros(B, dtype=torch.long, device=dev))
    hcols = (off[:, None] + torch.arange(W - 1, device=dev)[None, :]).clamp(
        max=line_vals.shape[2] - 1)
    hist = line_vals.gather(2, hcols[:, None, :].expand(B, D, W - 1))  # [B, D, W-1]

    xb = x.view(B, N, D)
    table = torch.cat([hist.transpose(1, 2).float(), xb.float()], dim=1)  # [B, W-1+N, D]
    src = _ancestor_sources(parents, num_nodes, W)  # [B, N, W]
    gathered = table.gather(1, src.view(B, N * W, 1).expand(B, N * W, D)).view(B, N, W, D)
    wf = weight.float().flip(1).t()  # [W, D], row j multiplies the input j steps back
    acc = (gathered * wf[None, None]).sum(2)
    if bias is not None:
        acc = acc + bias.float()
    if silu:
        acc = F.silu(acc)
    node_ok = torch.arange(N, device=dev)[None, :] < num_nodes.long()[:, None]
    acc = torch.where(node_ok[:, :, None], acc, torch.zeros_like(acc))
    out.copy_(acc.view(B * N, D).to(out.dtype))

    if stage_inputs:
        staged = line_vals.clone()
        staged[:, :, :W - 2] = hist[:, :, 1:]
        xs = xb.transpose(1, 2).to(staged.dtype)  # [B, D, N]
        tail = staged[:, :, W - 2:W - 2 + N]
        staged[:, :, W - 2:W - 2 + N] = torch.where(node_ok[:, None, :], xs, tail)
        staged = torch.where(active[:, None, None], staged, line_vals)
        if bool(active.any()):
            conv_state[lines[active]] = staged[active]
    return out


def tree_gated_delta_rule_torch(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, state_pool,
                                initial_state_indices, node_state_indices, slot_pool, out, scale,
                                use_qk_l2norm, softplus_beta, softplus_threshold):
    B, N = parents.shape
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    group = HV // H
    dev = q.device
    qf = q.float().view(B, N, H, K).repeat_interleave(group, dim=2)  # [B, N, HV, K]
    kf = k.float().view(B, N, H, K).repeat_interleave(group, dim=2)
    vf = v.float().view(B, N, HV, V)
    if use_qk_l2norm:
        qf = qf * torch.rsqrt((qf * qf).sum(-1, keepdim=True) + 1e-6)
        kf = kf * torch.rsqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
    qf = qf * scale
    x = a.float().view(B, N, HV) + dt_bias.float()
    g = -torch.exp(A_log.float()) * F.softplus(x, beta=softplus_beta, threshold=softplus_threshold)
    decay = torch.exp(g)
    beta = torch.sigmoid(b.float().view(B, N, HV))

    nn_ = num_nodes.long()
    active = nn_ > 0
    init_lines = torch.where(active, initial_state_indices.long(),
                             torch.zeros_like(initial_state_indices.long()))
    S = state_pool[init_lines].float()  # [B, HV, V, K]
    S = torch.where(active[:, None, None, None], S, torch.zeros_like(S))
    par = parents.long()
    slots = node_state_indices.long()
    o = torch.zeros(B, N, HV, V, dtype=torch.float32, device=dev)
    for n in range(N):
        live = n < nn_
        if not bool(live.any()):
            break
        reload = live & (par[:, n] != n - 1)
        if bool(reload.any()):
            par_slot = slots.gather(1, par[:, n].clamp(min=0)[:, None]).squeeze(1)
            reloaded = slot_pool[par_slot.clamp(min=0)].float()
            S = torch.where(reload[:, None, None, None], reloaded, S)
        S = S * decay[:, n, :, None, None]
        kn = kf[:, n]
        delta = (vf[:, n] - torch.einsum("bhvk,bhk->bhv", S, kn)) * beta[:, n, :, None]
        S = S + delta[..., None] * kn[:, :, None, :]
        o[:, n] = torch.einsum("bhvk,bhk->bhv", S, qf[:, n])
        idx = torch.nonzero(live).squeeze(1)
        slot_pool.index_copy_(0, slots[idx, n], S[idx].to(slot_pool.dtype))
    o = torch.where((torch.arange(N, device=dev)[None, :] < nn_[:, None])[:, :, None, None], o,
                    torch.zeros_like(o))
    out.copy_(o.view(B * N, HV, V).to(out.dtype))
    return out
