"""scripts/gpu_ddtree_profile.py's summary of a torch.profiler run (no profiler needed)."""

from __future__ import annotations

from types import SimpleNamespace

import gpu_ddtree_profile  # scripts/ is on the path (tests/conftest.py)


def _evt(key, count, cpu_total_us, self_cpu_us=0.0, self_dev_us=0.0):
    return SimpleNamespace(key=key, count=count, cpu_time_total=cpu_total_us,
                           self_cpu_time_total=self_cpu_us, self_device_time_total=self_dev_us)


def test_a_range_seen_on_cpu_and_as_a_gpu_annotation_keeps_its_cpu_time():
    """With CUDA activities each ddtree:: range comes twice under one name: the CPU op (its CPU
    time) and the GPU-side annotation (none). The H100 profile of 24 Nov reported 0.0 ms for every
    range because the annotation, listed after, replaced the CPU op."""
    events = [_evt("ddtree::sample", 10, 4000.0), _evt("aten::_local_scalar_dense", 30, 50.0),
              _evt("ddtree::sample", 10, 0.0, self_dev_us=900.0),
              _evt("ddtree::propose", 10, 0.0), _evt("ddtree::propose", 10, 2500.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    out = gpu_ddtree_profile._profile_summary(prof, steps=10, cuda=True)
    assert out["ddtree_ranges"]["ddtree::sample"] == {"calls_per_step": 1.0, "cpu_ms_per_step": 0.4}
    assert out["ddtree_ranges"]["ddtree::propose"] == {"calls_per_step": 1.0, "cpu_ms_per_step": 0.25}
    assert out["host_syncs_per_step"] == 3.0
