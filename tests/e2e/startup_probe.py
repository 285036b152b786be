"""Start one in-process DDTree engine (CPU) and report what ran during the start (vLLM's memory
profile run included): how often each tree-verify entry point was called, and the token counts
of the profile's dummy runs; then generate a few tokens and count again (so a probe that counts
nothing is caught). Prints one ``RESULT {json}`` line. Used by tests/e2e/test_ddtree_startup.py."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter

CALLS: Counter = Counter()
SIZES: dict[str, list[int]] = {"target_dummy_run": [], "drafter_dummy_run": []}


def _count(owner, name: str, label: str | None = None, size_arg: str | None = None):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS[label or name] += 1
        if size_arg is not None:
            SIZES[size_arg].append(int(kwargs.get("num_tokens", args[1] if len(args) > 1 else -1)))
        return fn(*args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ddtree.tree
    import vllm.v1.spec_decode.ddtree as glue
    from vllm import LLM, SamplingParams
    from vllm.v1.spec_decode.dflash import DFlashProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # every entry point of the tree path that does per-request or per-node work
    _count(ddtree.tree, "build_tree")
    for name in ("on_positions", "sample", "drafter_inputs", "_commit", "after_propose"):
        _count(glue.DDTreeRunnerState, name)
    for name in ("_gdn_plan", "gdn_tree_spec_forward", "cpu_gdn_tree_spec_forward"):
        _count(glue, name)
    _count(glue.DDTreeProposer, "propose", "DDTreeProposer.propose")
    _count(GPUModelRunner, "_dummy_run", size_arg="target_dummy_run")
    _count(DFlashProposer, "dummy_run", size_arg="drafter_dummy_run")

    # the vLLM hooks import these names from the module at call time: patched above
    llm = LLM(model=cfg["model"], enforce_eager=True, max_model_len=4096, language_model_only=True,
              enable_prefix_caching=False, seed=0, max_num_seqs=cfg["max_num_seqs"],
              speculative_config=cfg["spec"])
    at_start = dict(CALLS)
    sizes_at_start = {k: list(v) for k, v in SIZES.items()}
    sc = llm.llm_engine.vllm_config.scheduler_config
    llm.generate([{"prompt_token_ids": cfg["prompt"]}],
                 SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, ignore_eos=True))
    print("RESULT " + json.dumps({
        "calls_at_start": at_start, "calls_after_generate": dict(CALLS),
        "dummy_run_tokens_at_start": sizes_at_start,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_seqs": sc.max_num_seqs,
        "num_speculative_tokens": llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens,
    }))


if __name__ == "__main__":
    main()
