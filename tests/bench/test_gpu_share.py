"""scripts/gpu_share.py: the shared-GPU engine memory settings the GPU checks read."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import gpu_share  # noqa: E402


def test_defaults_without_env(monkeypatch):
    monkeypatch.delenv("DDTREE_GPU_MEM_UTIL", raising=False)
    monkeypatch.delenv("DDTREE_KV_CACHE_GIB", raising=False)
    assert gpu_share.engine_memory_kwargs(0.5) == {"gpu_memory_utilization": 0.5}
    assert not gpu_share.gpu_shared()


def test_shared_settings(monkeypatch):
    monkeypatch.setenv("DDTREE_GPU_MEM_UTIL", "0.12")
    monkeypatch.setenv("DDTREE_KV_CACHE_GIB", "1.5")
    kw = gpu_share.engine_memory_kwargs(0.5)
    assert kw == {"gpu_memory_utilization": 0.12, "kv_cache_memory_bytes": 3 * (1 << 29)}
    assert gpu_share.gpu_shared()


@pytest.mark.parametrize("name,value", [("DDTREE_GPU_MEM_UTIL", "0"), ("DDTREE_GPU_MEM_UTIL", "1.5"),
                                        ("DDTREE_GPU_MEM_UTIL", "half"), ("DDTREE_KV_CACHE_GIB", "-1")])
def test_bad_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.delenv("DDTREE_GPU_MEM_UTIL", raising=False)
    monkeypatch.delenv("DDTREE_KV_CACHE_GIB", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        gpu_share.engine_memory_kwargs(0.5)


def test_vllm_accepts_the_keyword():
    """kv_cache_memory_bytes is an EngineArgs field of the pinned vLLM (it skips the memory profile)."""
    vllm_args = pytest.importorskip("vllm.engine.arg_utils")
    assert "kv_cache_memory_bytes" in vllm_args.EngineArgs.__dataclass_fields__


def test_gdn_prefill_config_defaults_to_triton_and_takes_the_override(monkeypatch):
    monkeypatch.delenv("GDN_PREFILL", raising=False)
    assert gpu_share.gdn_prefill_config() == {"gdn_prefill_backend": "triton"}
    monkeypatch.setenv("GDN_PREFILL", "flashinfer")
    assert gpu_share.gdn_prefill_config() == {"gdn_prefill_backend": "flashinfer"}
