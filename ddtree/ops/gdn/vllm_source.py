"""Test/benchmark helper: vLLM 0.26's own chain kernels, compiled from its python sources.

Used only to compare our tree kernels on chain trees with what vLLM runs today. vLLM's code is
not copied into this repository: the functions are parsed out of the installed (or extracted)
vLLM source files at run time and executed with plain ``triton``/``torch``, so neither ``vllm``
nor its compiled ``vllm._C`` is imported. Source root: $DDTREE_VLLM_SRC (a directory holding the
``vllm`` package, or the package itself), else the installed ``vllm`` package.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

_FILES = {
    "fused_sigmoid_gating_delta_rule_update": (
        "third_party/flash_linear_attention/ops/fused_sigmoid_gating.py",
        ["fused_sigmoid_gating_delta_rule_update_kernel", "fused_sigmoid_gating_delta_rule_update"]),
    "causal_conv1d_update": (
        "model_executor/layers/mamba/ops/causal_conv1d.py",
        ["_causal_conv1d_update_kernel", "causal_conv1d_update"]),
}


def vllm_package_dir() -> Path | None:
    env = os.environ.get("DDTREE_VLLM_SRC")
    if env:
        p = Path(env)
        return p / "vllm" if (p / "vllm").is_dir() else p
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return None


def load_vllm_chain_op(name: str):
    """Return vLLM's python function ``name`` (one of the keys of _FILES) or raise FileNotFoundError."""
    import numpy as np
    import torch
    import triton
    import triton.language as tl

    root = vllm_package_dir()
    if root is None:
        raise FileNotFoundError("no vLLM sources found (set DDTREE_VLLM_SRC)")
    rel, wanted = _FILES[name]
    path = root / rel
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    missing = set(wanted) - {d.name for d in defs}
    if missing:
        raise FileNotFoundError(f"{path}: functions {sorted(missing)} not found")
    module = ast.Module(body=defs, type_ignores=[])
    # Triton's JIT reads the source of the kernel through linecache/inspect: give it a real file.
    namespace = {"torch": torch, "triton": triton, "tl": tl, "np": np,
                 "NULL_BLOCK_ID": 0, "PAD_SLOT_ID": -1, "__name__": f"_vllm_src_{name}"}
    code = compile(module, str(path), "exec")
    exec(code, namespace)
    return namespace[name]
