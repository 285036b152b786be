"""Capture what vLLM's DFlash proposer sees and computes on its first step (in-process engine), and
recompute it with the training-side drafter forward of scripts/train_tiny_pair.py.

    python tests/pair/parity_probe.py MODELS_DIR PROMPT_LEN
Prints max abs differences of the aux features and the drafter logits, and the draft tokens of both.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))


def capture(models: Path, prompt: list[int]):
    import torch
    from vllm import LLM, SamplingParams
    from vllm.v1.spec_decode import llm_base_proposer as lbp

    rec = {}
    orig = lbp.SpecDecodeBaseProposer.propose

    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, *a, **k):
        first = "aux" not in rec
        if first:
            rec["aux"] = target_hidden_states.detach().float().clone()
            rec["tokens"] = target_token_ids.detach().clone()
            rec["positions"] = target_positions.detach().clone()
            rec["next"] = next_token_ids.detach().clone()
            model = self.model
            orig_cl = model.compute_logits

            def cl(h):
                out = orig_cl(h)
                rec.setdefault("logits", out.detach().float().clone())
                return out
            model.compute_logits = cl
        out = orig(self, num_speculative_tokens, target_token_ids, target_positions,
                   target_hidden_states, next_token_ids, *a, **k)
        if first:
            rec["drafts"] = out.detach().clone()
            model.compute_logits = orig_cl
        return out

    lbp.SpecDecodeBaseProposer.propose = propose
    llm = LLM(model=str(models / "target"), language_model_only=True, enforce_eager=True,
              max_model_len=1024, enable_prefix_caching=False, max_num_seqs=1,
              speculative_config={"method": "dflash", "model": str(models / "drafter"),
                                  "num_speculative_tokens": 15}, seed=0)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4, temperature=0.0))
    return rec


def recompute(models: Path, prompt: list[int], nxt: int):
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    import train_tiny_pair as ttp

    cfg = json.loads((models / "target" / "config.json").read_text())
    tcfg = Qwen3_5TextConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    tcfg._attn_implementation = "sdpa"
    target = Qwen3_5ForCausalLM(tcfg)
    sd = {k.replace("model.language_model.", "model."): v.float()
          for k, v in load_file(models / "target" / "model.safetensors").items()}
    target.load_state_dict(sd)
    target.eval()
    dcfg_json = json.loads((models / "drafter" / "config.json").read_text())
    ids = dcfg_json["dflash_config"]["target_layer_ids"]
    tap = ttp.LayerTap(target.model.layers, ids)
    D = ttp.build_drafter_class()
    drafter = D(ttp.drafter_cfg(tcfg, dcfg_json["num_hidden_layers"], len(ids)))
    drafter.load_state_dict({k: v.float() for k, v in
                             load_file(models / "drafter" / "model.safetensors").items()})
    drafter.eval()
    seq = torch.tensor([prompt + [nxt] + [0] * 15])
    with torch.no_grad():
        target(input_ids=seq[:, :len(prompt)])
        aux = tap.features()
        anchors = torch.tensor([[len(prompt)]])
        block = torch.full((1, 1, 16), dcfg_json["dflash_config"]["mask_token_id"])
        block[0, 0, 0] = nxt
        hid = drafter(aux, anchors, block, target.model.embed_tokens)
        logits = target.lm_head(hid[0, 0, 1:])
    return aux[0], logits


def main():
    import json

    models = Path(sys.argv[1])
    n = int(sys.argv[2])
    import measure_tiny_pair as mtp
    prompt = mtp.heldout_prompts(models / "target" / "tokenizer.json", 1, n, n)[0]
    rec = capture(models, prompt)
    aux, logits = recompute(models, prompt, int(rec["next"][0]))
    vl = rec["logits"][:15]
    top2 = logits.topk(2, dim=-1).values
    result = {
        "prompt_len": len(prompt),
        "aux_max_abs_diff": float((rec["aux"][: len(prompt)] - aux).abs().max()),
        "aux_max_abs": float(aux.abs().max()),
        "logits_max_abs_diff": float((vl - logits).abs().max()),
        "logits_max_abs": float(logits.abs().max()),
        "vllm_drafts": rec["drafts"].flatten().tolist(),
        "our_drafts": logits.argmax(-1).tolist(),
        # positions where ours has a clear top-1 (margin above bf16 noise) must agree with vLLM
        "clear_margin": ((top2[:, 0] - top2[:, 1]) > 0.25).tolist(),
    }
    print("PARITY " + json.dumps(result))


if __name__ == "__main__":
    main()
