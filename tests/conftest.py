import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


# Triton reads TRITON_INTERPRET when a @triton.jit function is *decorated*: a helper decorated before
# the flag is set stays a compiled-mode JITFunction and fails inside an interpreted kernel ("Cannot
# call @triton.jit'd outside of the scope of a kernel"). Collection imports every test module (and,
# through vLLM, triton itself) in one process, so the flag must be set here, before any of them.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny tokenizer / hybrid target / DFlash drafter (made once, reused while unchanged)."""
    import tiny_models as tm
    return tm.make_all(REPO / "build" / "tiny-models")


@pytest.fixture(scope="session")
def log_dir() -> Path:
    d = REPO / "build" / "test-logs"
    d.mkdir(parents=True, exist_ok=True)
    return d
