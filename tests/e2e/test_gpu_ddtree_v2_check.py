"""The pass/fail logic of scripts/gpu_ddtree_v2_check.py on synthetic records (the script itself needs
a GPU: vLLM's V2 model runner does not run on the CPU wheel)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("gpu_ddtree_v2_check", REPO / "scripts" / "gpu_ddtree_v2_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree_record(**over):
    rec = {"runner_class": "vllm.v1.worker.gpu.model_runner.GPUModelRunner",
           "speculator_class": "DDTreeSpeculator", "ddtree_fallback_reason": None,
           "ddtree_counters": {"steps": 40, "nodes_verified": 400, "sibling_taken": 3},
           "fallback_metric": {}}
    rec.update(over)
    return rec


def test_tree_mode_checks():
    m = _script()
    cfgs = m.mode_configs(Path("models/tiny-pair"))
    assert all(m.mode_checks("ddtree-oracle", cfgs["ddtree-oracle"], _tree_record(), "").values())
    # the V1 runner, a fallback, chain-only blocks, or no siblings must each fail a check
    bad = [_tree_record(runner_class="vllm.v1.worker.gpu_model_runner.GPUModelRunner"),
           _tree_record(ddtree_fallback_reason="V2 model runner (x) with DDTREE_V2_TREE=0: flat DFlash (the V2 rollback switch)"),
           _tree_record(ddtree_counters={"steps": 40, "nodes_verified": 40, "sibling_taken": 3}),
           _tree_record(ddtree_counters={"steps": 40, "nodes_verified": 400, "sibling_taken": 0}),
           _tree_record(speculator_class="DFlashSpeculator")]
    for rec in bad:
        assert not all(m.mode_checks("ddtree-oracle", cfgs["ddtree-oracle"], rec, "").values()), rec


def test_fallback_mode_checks():
    m = _script()
    cfg = m.mode_configs(Path("models/tiny-pair"))["ddtree-fallback"]
    rec = _tree_record(speculator_class="DFlashSpeculator", ddtree_counters={},
                       ddtree_fallback_reason="V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1) with DDTREE_V2_TREE=0: flat DFlash (the V2 rollback switch)",
                       fallback_metric={"V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1) with DDTREE_V2_TREE=0: flat DFlash (the V2 rollback switch)": 1.0})
    log = "INFO dflash_ddtree (budget=16, ...): tree verify is not available here (V2 ...)"
    assert all(m.mode_checks("ddtree-fallback", cfg, rec, log).values())
    assert not m.mode_checks("ddtree-fallback", cfg, rec, "no such line")["fallback_logged"]
    assert not m.mode_checks("ddtree-fallback", cfg, dict(rec, fallback_metric={}), log)["fallback_metric"]
    assert not m.mode_checks("ddtree-fallback", cfg, dict(rec, ddtree_counters={"steps": 3}), log)["fallback_path"]


def test_logprob_agreement():
    m = _script()
    ref = [{"tokens": [5, 6, 7], "top2": [[(5, 12.0), (1, 11.0)], [(6, 9.5), (2, 3.0)], [(7, 4.0), (3, 1.0)]]}]
    same = [{"tokens": [5, 6, 7], "top2": [[(5, 12.0625), (1, 11.0)], [(6, 9.5), (2, 3.0)], [(7, 4.0), (3, 1.0)]]}]
    r = m.logprob_agreement(ref, same)
    assert r["compared"] == 3 and r["over_tol"] == 0
    # another node's row: the committed token is far off or missing from the top-k
    wrong = [{"tokens": [5, 6, 7], "top2": [[(5, 12.0), (1, 11.0)], [(2, 9.5), (6, 1.0)], [(3, 4.0), (1, 1.0)]]}]
    assert m.logprob_agreement(ref, wrong)["over_tol"] == 2


def test_fallback_count_survives_vllms_metric_unregister():
    """vLLM's stat logger unregisters every vllm:* collector created before it (the fallback is
    counted while the config is validated, earlier): the check reads the counter itself."""
    pytest.importorskip("prometheus_client")
    ddtree_config = pytest.importorskip("vllm.config.ddtree")
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    m = _script()
    before = m._fallback_counts().get("unit-test reason", 0.0)
    ddtree_config.record_fallback("unit-test reason: details")
    unregister_vllm_metrics()
    assert m._fallback_counts().get("unit-test reason", 0.0) == before + 1
