# ddtree-vllm overlay module (copied into vllm/model_executor/models/llada2.py by scripts/apply_overlays.py)
"""LLaDA2.0 (``LLaDA2MoeModelLM``): a block-diffusion MoE language model.

The network is a Ling-2.0-style MoE: fused QKV without bias, per-head RMSNorm on Q and K before a
NeoX RoPE on the first ``rotary_dim`` (half) of each head, ``first_k_dense_replace`` dense layers,
then MoE layers with an fp32 sigmoid router whose ``expert_bias`` only steers the (group-limited)
expert choice, normalised weights times ``routed_scaling_factor``, plus one shared expert.

What differs from an autoregressive model is the attention pattern: block-causal (a query sees every
key in its own block and all earlier blocks). The engine's block decode (vllm/v1/worker/llada2_block.py)
schedules at most one whole block per request per step, so inside one step that pattern is plain
non-causal attention over the request's cached context plus the block; the runner asks the attention
backend for non-causal metadata for this model. The model itself is a normal vLLM decoder.
"""


from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoE
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.sequence import IntermediateTensors

from .utils import AutoWeightsLoader, WeightsMapper, maybe_prefix


def group_limited_sigmoid_topk(
    router_logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA2 routing: returns (weights fp32 [T, k], expert ids int32 [T, k]).

    scores = sigmoid(logits) in fp32; the selection uses scores + bias: each of ``n_group`` groups is
    scored by the sum of its two best biased scores, the best ``topk_group`` groups are kept and the
    ``top_k`` best experts inside them are chosen. The weights are the *unbiased* scores of those
    experts, normalised to sum 1 (+1e-20) and multiplied by ``scaling``.
    """
    scores = torch.sigmoid(router_logits.float())
    biased = scores if expert_bias is None else scores + expert_bias.float()
    num_tokens, num_experts = biased.shape
    per_group = num_experts // n_group
    group_score = biased.view(num_tokens, n_group, per_group).topk(2, dim=-1).values.sum(-1)
    kept_groups = group_score.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept_groups, True)
    keep = keep.unsqueeze(-1).expand(num_tokens, n_group, per_group).reshape(num_tokens, -1)
    ids = biased.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize and top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)


class _LLaDA2Routing:
    """FusedMoE custom routing bound to one layer's expert bias (FusedMoE passes no bias itself)."""

    def __init__(self, gate: nn.Module, config) -> None:
        self.gate = gate
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.normalize = bool(config.norm_topk_prob)
        self.scaling = float(config.routed_scaling_factor or 1.0)

    def __call__(self, hidden_states, gating_output, topk, renormalize):
        return group_limited_sigmoid_topk(
            gating_output, getattr(self.gate, "expert_bias", None), topk,
            self.n_group, self.topk_group, self.normalize, self.scaling,
        )


class LLaDA2MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int,
                 quant_config: QuantizationConfig | None, reduce_results: bool = True,
                 prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, quant_config=quant_config,
            reduce_results=reduce_results, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class LLaDA2SparseMoe(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None, prefix: str = "") -> None:
        super().__init__()
        if getattr(config, "score_function", "sigmoid") != "sigmoid":
            raise ValueError("LLaDA2MoeModelLM: only score_function='sigmoid' is supported, "
                             f"got {config.score_function!r}")
        n_group = config.n_group or 1
        if config.num_experts % n_group:
            raise ValueError(f"LLaDA2MoeModelLM: num_experts ({config.num_experts}) must be a "
                             f"multiple of n_group ({n_group})")
        self.hidden_size = config.hidden_size
        # The router always runs in fp32 (router_dtype "fp32" in every released checkpoint).
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False,
                              dtype=torch.float32)
        if getattr(config, "moe_router_enable_expert_bias", True):
            self.gate.expert_bias = nn.Parameter(
                torch.zeros(config.num_experts, dtype=torch.float32), requires_grad=False)
        self.experts = FusedMoE(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            custom_routing_function=_LLaDA2Routing(self.gate, config),
            scoring_func="sigmoid",
            router_logits_dtype=torch.float32,
        )
        if config.num_shared_experts:
            shared = (getattr(config, "moe_shared_expert_intermediate_size", None)
                      or config.moe_intermediate_size) * config.num_shared_experts
            self.shared_experts = LLaDA2MLP(config.hidden_size, shared, quant_config,
                                            prefix=f"{prefix}.shared_experts")
        else:
            self.shared_experts = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states.float())
        out = self.experts(hidden_states=hidden_states, router_logits=router_logits)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class LLaDA2Attention(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str = "") -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.total_heads = config.num_attention_heads
        self.total_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim or config.hidden_size // self.total_heads
        self.num_heads = self.total_heads // tp
        self.num_kv_heads = max(1, self.total_kv_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.use_qk_norm = getattr(config, "use_qk_norm", True)
        self.query_key_value = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.total_heads, self.total_kv_heads,
            bias=bool(config.use_qkv_bias or config.use_bias), quant_config=quant_config,
            prefix=f"{prefix}.query_key_value")
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dense = RowParallelLinear(
            self.total_heads * self.head_dim, config.hidden_size, bias=bool(config.use_bias),
            quant_config=quant_config, prefix=f"{prefix}.dense")
        rotary_dim = getattr(config, "rotary_dim", None) or int(
            self.head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 600000.0)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": theta,
                             "partial_rotary_factor": rotary_dim / self.head_dim},
            is_neox_style=True,
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                              num_kv_heads=self.num_kv_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.query_key_value(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.use_qk_norm:
            q = self.query_layernorm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(-1, self.q_size)
            k = self.key_layernorm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.dense(self.attn(q, k, v))
        return out


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = LLaDA2Attention(config, cache_config, quant_config,
                                         prefix=f"{prefix}.attention")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = LLaDA2MLP(config.hidden_size, config.intermediate_size, quant_config,
                                 prefix=f"{prefix}.mlp")
        else:
            self.mlp = LLaDA2SparseMoe(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.attention(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class LLaDA2Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.word_embeddings")
        self.layers = nn.ModuleList([
            LLaDA2DecoderLayer(config, i, vllm_config.cache_config, vllm_config.quant_config,
                               prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LLaDA2MoeModelLM(nn.Module):
    """vLLM model class for ``architectures: ["LLaDA2MoeModelLM"]`` (HF weight names)."""

    # Marks the model for the block-decode engine path (vllm/v1/worker/llada2_block.py).
    is_llada2_block_diffusion = True

    packed_modules_mapping = {
        "query_key_value": ["query_key_value"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
        ".mlp.up_proj": (".mlp.gate_up_proj", 1),
        ".shared_experts.gate_proj": (".shared_experts.gate_up_proj", 0),
        ".shared_experts.up_proj": (".shared_experts.gate_up_proj", 1),
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = LLaDA2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.model.word_embeddings
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["lm_head."] if getattr(self.config, "tie_word_embeddings", False) else None
        loader = AutoWeightsLoader(self, skip_prefixes=skip)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
