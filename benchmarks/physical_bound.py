"""The memory-bandwidth bound on decode throughput, from the checkpoints and a measured bandwidth.

One verify step (or one plain decode step) must at least read every weight of the target once, the
drafter's weights once when speculating (its drafting pass), and, per request, the full-attention KV
of its context and its Gated-DeltaNet recurrent + conv state (read and written back). It commits
``acceptance_length`` tokens per request. So

    tokens/s <= concurrency * acceptance_length * bandwidth / bytes_per_step
    bytes_per_step = W_target + W_drafter + concurrency * (kv_bytes_per_token * context + 2 * gdn_state)

``bandwidth`` is the device-to-device copy rate measured in the same run (bytes read + written per
second), the rate the memory system actually sustains. The bound ignores compute, launch overhead and
the drafter's KV (small), so real runs sit below it; how far below is the point of printing it.
"""

from __future__ import annotations

import json
from pathlib import Path


def _weights(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _text_config(folder: Path) -> dict:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return cfg.get("text_config", cfg)


def model_bytes(target: Path, drafter: Path) -> dict:
    """Weight bytes and per-request state bytes of a hybrid target (+ drafter)."""
    t = _text_config(target)
    types = t.get("layer_types") or ["full_attention"] * t["num_hidden_layers"]
    n_full = sum(1 for x in types if x == "full_attention")
    n_lin = sum(1 for x in types if x == "linear_attention")
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    kv_per_token = n_full * 2 * t["num_key_value_heads"] * head_dim * 2          # bf16 K and V
    state_bytes = 4 if str(t.get("mamba_ssm_dtype", "float32")) == "float32" else 2
    gdn_state = 0
    if n_lin:
        hv, dk, dv = t["linear_num_value_heads"], t["linear_key_head_dim"], t["linear_value_head_dim"]
        conv_dim = 2 * t["linear_num_key_heads"] * dk + hv * dv
        conv_k = t.get("linear_conv_kernel_dim", 4)
        gdn_state = n_lin * (hv * dk * dv * state_bytes + conv_dim * (conv_k - 1) * 2)
    return {"target_weight_bytes": _weights(target), "drafter_weight_bytes": _weights(drafter),
            "kv_bytes_per_token": kv_per_token, "gdn_state_bytes_per_request": gdn_state,
            "full_attention_layers": n_full, "linear_attention_layers": n_lin}


def bound_tokens_per_s(sizes: dict, bandwidth: dict | None, concurrency: int,
                       acceptance_length: float, speculative: bool, prompt_tokens: float,
                       output_len: int) -> dict | None:
    """The bound for one benchmark point (None without a measured bandwidth)."""
    if not bandwidth:
        return None
    context = prompt_tokens + output_len / 2                       # mean context during decode
    per_request = sizes["kv_bytes_per_token"] * context + 2 * sizes["gdn_state_bytes_per_request"]
    weights = sizes["target_weight_bytes"] + (sizes["drafter_weight_bytes"] if speculative else 0)
    step_bytes = weights + concurrency * per_request
    tokens_per_step = concurrency * acceptance_length
    return {"tokens_per_s": tokens_per_step * bandwidth["bytes_per_s"] / step_bytes,
            "bytes_per_step": step_bytes, "tokens_per_step": tokens_per_step,
            "step_us_at_bound": step_bytes / bandwidth["bytes_per_s"] * 1e6}
