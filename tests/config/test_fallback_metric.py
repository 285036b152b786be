"""The fallback counter (vllm:ddtree_fallback_total) survives vLLM's stat-logger start.

The config counts a fallback while it is validated; vLLM's stat logger starts later and removes
every ``vllm:*`` collector from prometheus' default registry (``unregister_vllm_metrics``). An
offline ``LLM.get_metrics()`` (``get_metrics_snapshot``) must still report the fallback."""

from __future__ import annotations


def _fallbacks(reason: str) -> int:
    from vllm.v1.metrics.reader import get_metrics_snapshot

    return sum(m.value for m in get_metrics_snapshot()
               if m.name == "vllm:ddtree_fallback" and m.labels.get("reason") == reason)


def test_fallback_is_visible_after_vllm_unregisters_its_collectors():
    from vllm.config.ddtree import record_fallback
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    before = _fallbacks("test-reason")
    record_fallback("test-reason: the detail after the colon is not a label")
    unregister_vllm_metrics()  # what the stat logger does when it starts
    assert _fallbacks("test-reason") == before + 1
    record_fallback("test-reason")
    unregister_vllm_metrics()
    assert _fallbacks("test-reason") == before + 2
