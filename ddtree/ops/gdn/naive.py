"""fp32 torch references for the tree-aware Gated DeltaNet ops.

Everything here is deliberately simple: one request, one root-to-node path at a time, plain
python loops. The fast paths (Triton kernels and the vectorised torch fallback) are checked
against these functions: the output and state of a tree node must equal running the chain
recurrence / chain conv over that node's root-to-node path.

The math is the decode form vLLM 0.26 uses for Qwen3.5 / Qwen3-Next GDN layers:

    g     = -exp(A_log) * softplus(a + dt_bias)        (per value head)
    beta  = sigmoid(b)                                 (per value head)
    q, k  = l2norm(q), l2norm(k)  (eps 1e-6 inside the rsqrt), then q *= scale (head_dim ** -0.5)
    S     = S * exp(g)
    v'    = beta * (v - S k)
    S     = S + v' k^T                                 S is [V, K] (value dim first, as vLLM stores it)
    o     = S q

Value head hv reads query/key head hv // (HV // H) (GQA: HV >= H, HV % H == 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def path_to_root(parents: list[int], node: int) -> list[int]:
    """Node indices from the root (node 0) down to ``node``, inclusive."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    path.reverse()
    return path


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
              softplus_beta: float = 1.0, softplus_threshold: float = 20.0):
    """(g, beta) in fp32 for a [..., HV] pair of gate inputs; softplus as torch/vLLM define it."""
    x = a.float() + dt_bias.float()
    softplus = F.softplus(x, beta=softplus_beta, threshold=softplus_threshold)
    g = -torch.exp(A_log.float()) * softplus
    return g, torch.sigmoid(b.float())


def naive_chain_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state, scale=None,
                           use_qk_l2norm=True):
    """Sigmoid-gated delta rule over a chain of T tokens of one request.

    q, k: [T, H, K]; v: [T, HV, V]; a, b: [T, HV]; initial_state: [HV, V, K].
    Returns (o [T, HV, V] fp32, states [T, HV, V, K] fp32: the state after each token).
    """
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    if scale is None:
        scale = K ** -0.5
    group = HV // H
    S = initial_state.float().clone()
    outs, states = [], []
    for t in range(T):
        qt = q[t].float().repeat_interleave(group, dim=0)  # [HV, K]
        kt = k[t].float().repeat_interleave(group, dim=0)
        vt = v[t].float()
        if use_qk_l2norm:
            qt = qt * torch.rsqrt((qt * qt).sum(-1, keepdim=True) + 1e-6)
            kt = kt * torch.rsqrt((kt * kt).sum(-1, keepdim=True) + 1e-6)
        qt = qt * scale
        g, beta = gdn_gates(a[t], b[t], A_log, dt_bias)
        S = S * torch.exp(g)[:, None, None]
        delta = (vt - torch.einsum("hvk,hk->hv", S, kt)) * beta[:, None]
        S = S + delta[:, :, None] * kt[:, None, :]
        outs.append(torch.einsum("hvk,hk->hv", S, qt))
        states.append(S.clone())
    return torch.stack(outs), torch.stack(states)


def naive_chain_conv1d(x, history, weight, bias=None, activation="silu"):
    """Causal depthwise conv over a chain of T tokens of one request.

    x: [T, D] (conv inputs); history: [D, W-1] (the cached inputs before the first token, oldest
    first); weight: [D, W]. Returns out [T, D] fp32: out[t] = act(bias + sum_j w[:, j] * win[j])
    where win is the last W inputs of history ++ x[:t+1].
    """
    W = weight.shape[1]
    seq = torch.cat([history.float(), x.float().t()], dim=1)  # [D, W-1+T]
    outs = []
    for t in range(x.shape[0]):
        win = seq[:, t:t + W]
        acc = (win * weight.float()).sum(-1)
        if bias is not None:
            acc = acc + bias.float()
        if activation in ("silu", "swish"):
            acc = F.silu(acc)
        outs.append(acc)
    return torch.stack(outs)


def naive_tree_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, initial_states,
                          scale=None, use_qk_l2norm=True):
    """Per node: the chain recurrence over its root-to-node path.

    q, k: [B*N, H, K]; v: [B*N, HV, V]; a, b: [B*N, HV]; parents: [B, N]; num_nodes: [B];
    initial_states: [B, HV, V, K]. Returns (o [B*N, HV, V], node_states [B, N, HV, V, K]), fp32,
    zeros for padding nodes.
    """
    Bn, N = parents.shape
    HV, V, K = v.shape[1], v.shape[2], q.shape[2]
    o = torch.zeros(Bn * N, HV, V)
    states = torch.zeros(Bn, N, HV, V, K)
    par = parents.tolist()
    for r in range(Bn):
        for n in range(int(num_nodes[r])):
            rows = [r * N + i for i in path_to_root(par[r], n)]
            out, st = naive_chain_delta_rule(q[rows], k[rows], v[rows], a[rows], b[rows],
                                             A_log, dt_bias, initial_states[r], scale,
                                             use_qk_l2norm)
            o[r * N + n] = out[-1]
            states[r, n] = st[-1]
    return o, states


def naive_tree_conv1d(x, histories, weight, parents, num_nodes, bias=None, activation="silu"):
    """Per node: the chain conv over its root-to-node path.

    x: [B*N, D]; histories: [B, D, W-1]. Returns out [B*N, D] fp32 (zeros for padding nodes).
    """
    Bn, N = parents.shape
    out = torch.zeros(Bn * N, x.shape[1])
    par = parents.tolist()
    for r in range(Bn):
        for n in range(int(num_nodes[r])):
            rows = [r * N + i for i in path_to_root(par[r], n)]
            out[r * N + n] = naive_chain_conv1d(x[rows], histories[r], weight, bias,
                                                activation)[-1]
    return out


def naive_conv_history_after(x_path, history):
    """The conv history ([D, W-1]) after a chain of inputs x_path [L, D] (L >= 0)."""
    W1 = history.shape[1]
    seq = torch.cat([history.float(), x_path.float().t()], dim=1)
    return seq[:, seq.shape[1] - W1:]
