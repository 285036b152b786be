"""Per-request DDTree shape (vllm_xargs ddtree_budget / ddtree_top_k) checked where vLLM checks
request parameters (``SamplingParams.verify``), on the patched vLLM of the test venv; no engine."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.config.ddtree import request_tree_shape, validate_ddtree_request  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.entrypoints.serve.utils.error_response import create_error_response  # noqa: E402


@pytest.fixture(scope="module")
def tree_config(tiny_models):
    args = EngineArgs(model=str(tiny_models / "target"), language_model_only=True, enforce_eager=True,
                      max_model_len=2048, max_num_seqs=8,
                      speculative_config={"method": "dflash_ddtree", "model": str(tiny_models / "drafter"),
                                          "ddtree_budget": 16, "ddtree_top_k": 4})
    return args.create_engine_config()


def _verify(cfg, extra):
    sp = SamplingParams(max_tokens=4, extra_args=extra)
    sp.verify(cfg.model_config, cfg.speculative_config, cfg.structured_outputs_config, None)
    return sp


@pytest.mark.parametrize("extra,field", [
    ({"ddtree_budget": 17}, "ddtree_budget"),
    ({"ddtree_budget": 0}, "ddtree_budget"),
    ({"ddtree_top_k": 5}, "ddtree_top_k"),
    ({"ddtree_top_k": 2.0}, "ddtree_top_k"),
    ({"ddtree_budget": "8"}, "ddtree_budget"),
    ({"ddtree_budget": True}, "ddtree_budget"),
    ({"ddtree_budget": 8, "ddtree_chain_seed": False}, "ddtree_chain_seed"),  # not a request setting
])
def test_bad_values_are_a_400_naming_the_field(tree_config, extra, field):
    with pytest.raises(ValueError, match=f"vllm_xargs.{field}") as exc:
        _verify(tree_config, extra)
    err = create_error_response(exc.value).error
    assert err.code == 400 and err.param == f"vllm_xargs.{field}" and field in err.message


def test_good_values_and_defaults(tree_config):
    sc = tree_config.speculative_config
    for extra, want in [(None, (16, 4)), ({}, (16, 4)), ({"ddtree_budget": 15, "ddtree_top_k": 1}, (15, 1)),
                        ({"ddtree_top_k": 2}, (16, 2)), ({"ddtree_budget": 1}, (1, 4)),
                        ({"other_extension": "x"}, (16, 4))]:
        sp = _verify(tree_config, extra)
        assert request_tree_shape(sc, sp) == want


def test_servers_without_tree_verify_reject_shapes(tree_config, monkeypatch):
    from types import SimpleNamespace

    sp = SamplingParams(extra_args={"ddtree_budget": 8})
    with pytest.raises(ValueError, match="dflash_ddtree"):
        validate_ddtree_request(sp, None)  # no speculative decoding at all
    sc = tree_config.speculative_config
    fake = SimpleNamespace(ddtree_budget=16, ddtree_top_k=4, ddtree_fallback="DDTREE_FORCE_CHAIN=1",
                           draft_model_config=sc.draft_model_config)
    with pytest.raises(ValueError, match="flat DFlash"):
        validate_ddtree_request(sp, fake)
    fake.ddtree_fallback = None
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="V2 model runner"):
        validate_ddtree_request(sp, fake)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    validate_ddtree_request(sp, fake)  # V1 tree verify: fine
