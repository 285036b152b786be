import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llada2() -> Path:
    """The tiny random LLaDA2 checkpoint (made once, reused while the generator is unchanged)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import tiny_llada2
    return tiny_llada2.make(REPO / "build" / "tiny-llada2")
