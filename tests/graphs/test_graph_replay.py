"""ddtree.graph_replay.ReplayCache: a function with in-place side effects runs exactly once per call
(eager on a key's first call, captured + replayed on the second, replayed later), on the inputs of
that call; CPU inputs always run eagerly."""

import functools

import pytest
import torch

from ddtree.graph_replay import ReplayCache


def _accumulate(buf, idx, val):
    # not idempotent: running it twice, or on another call's inputs, changes the result; ``buf`` is
    # bound into the function (inputs are copied into the graph's static buffers)
    buf.index_add_(0, idx, val * 2 + 1)


def test_cpu_runs_eagerly_every_time():
    cache = ReplayCache()
    buf = torch.zeros(4)
    for _ in range(3):
        cache.run("k", functools.partial(_accumulate, buf), [torch.tensor([1]), torch.tensor([1.0])])
    assert buf.tolist() == [0.0, 9.0, 0.0, 0.0]
    assert (cache.eager_runs, cache.captures, cache.replays) == (3, 0, 0)


def test_bad_size():
    with pytest.raises(ValueError, match="max_graphs"):
        ReplayCache(max_graphs=0)


@pytest.mark.gpu
def test_cuda_once_per_call_with_each_calls_inputs():
    dev = torch.device("cuda")  # gpu marker: tests/conftest.py skips it without CUDA
    cache = ReplayCache(max_graphs=2)
    buf = torch.zeros(8, device=dev)
    fn = functools.partial(_accumulate, buf)
    ref = torch.zeros(8)
    calls = [([1, 2], [1.0, 2.0]), ([3, 3], [0.5, 4.0]), ([0, 7], [3.0, -1.0]), ([5, 1], [2.0, 2.0])]
    for idx, val in calls:
        i, v = torch.tensor(idx, device=dev), torch.tensor(val, device=dev)
        cache.run("k", fn, [i, v])
        _accumulate(ref, torch.tensor(idx), torch.tensor(val))
        torch.cuda.synchronize()
        assert torch.allclose(buf.cpu(), ref), (idx, val)
    assert (cache.eager_runs, cache.captures, cache.replays) == (1, 1, 3)
    # another shape is another key: eager first, then a graph; the LRU keeps at most 2 keys
    cache.run("k", fn, [torch.tensor([1, 2, 3], device=dev), torch.ones(3, device=dev)])
    assert cache.eager_runs == 2 and len(cache._entries) == 2
