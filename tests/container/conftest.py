"""Fixtures for the image tests: a Docker engine (skips cleanly where none can be started), the local
Debian base image and the cpu flavour, each made once per session."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dockertools  # noqa: E402


@pytest.fixture(scope="session")
def docker_engine(log_dir):
    engine, why = dockertools.start_engine(log_dir)
    if engine is None:
        pytest.skip(f"no Docker engine: {why}")
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def cpu_image(docker_engine, log_dir) -> dict:
    """The cpu flavour built from this checkout against the local Debian base; the timings and
    the size go to build/test-logs/container-image.json."""
    base = dockertools.make_base(docker_engine, log_dir)
    info = dockertools.build_cpu_image(docker_engine, log_dir)
    report = {**base, **{k: v for k, v in info.items() if k != "labels"},
              "size_gb": round(info["size_bytes"] / 1e9, 2)}
    (log_dir / "container-image.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ncpu image: {report}")
    return info
