"""A Docker engine, the local Debian base and the cpu image for the container tests.

The engine: the running one if `docker info` answers; else, as root with `dockerd` installed, one
started here in its own session (log: build/test-logs/dockerd.log) and stopped by its PID at the end
of the session; else none (the tests skip). Builds use a client with BuildKit built in: `docker` when
it has buildx, else Debian's `/usr/bin/docker` (docker.io), or $DOCKER.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Named by the script's content, so a changed package list makes a new base.
BASE_TAG = "ddtree-vllm-base:bookworm-" + hashlib.sha256(
    (REPO / "scripts" / "make_debian_base.sh").read_bytes()).hexdigest()[:12]
CPU_IMAGE = "ddtree-vllm:test-cpu"


def _works(cmd: list[str], timeout: float = 20) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def docker_client() -> str | None:
    """A docker CLI that can run BuildKit builds with --secret."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    plain = shutil.which("docker")
    if plain and _works([plain, "buildx", "version"]):
        return plain
    for cand in ("/usr/bin/docker", plain):
        if cand and Path(cand).exists():
            return cand
    return None


class Engine:
    """The engine in use, and the dockerd this session started (if any)."""

    def __init__(self, docker: str, started: subprocess.Popen | None = None):
        self.docker = docker
        self.started = started

    def run(self, *args: str, timeout: float = 600, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([self.docker, *args], capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def stop(self) -> None:
        if self.started is None or self.started.poll() is not None:
            return
        os.kill(self.started.pid, signal.SIGTERM)
        try:
            self.started.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(self.started.pid, signal.SIGKILL)
            self.started.wait(10)


def start_engine(log_dir: Path) -> tuple[Engine | None, str]:
    """(engine, "") or (None, why there is none)."""
    docker = docker_client()
    if docker is None:
        return None, "no docker client installed"
    if _works([docker, "info"]):
        return Engine(docker), ""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return None, "no Docker engine running and no dockerd installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return None, "no Docker engine running, and starting dockerd needs root"
    log = open(log_dir / "dockerd.log", "ab")
    proc = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"dockerd exited with {proc.returncode} (log: {log_dir / 'dockerd.log'})"
        if _works([docker, "info"]):
            return Engine(docker, proc), ""
        time.sleep(1)
    Engine(docker, proc).stop()
    return None, "dockerd did not answer within 60 s"


def series_digest() -> str:
    return subprocess.run([str(REPO / "container" / "series_digest.sh"), str(REPO)], capture_output=True,
                          text=True, check=True).stdout.strip()


def ca_bundle() -> str | None:
    """The CA bundle pip uses here (handed to the build as a BuildKit secret, never a layer)."""
    for cand in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                 "/etc/ssl/certs/ca-certificates.crt"):
        if cand and Path(cand).is_file():
            return cand
    return None


def make_base(engine: Engine, log_dir: Path) -> dict:
    """The local Debian base (debootstrap + docker import), reused while the tag exists."""
    if engine.run("image", "inspect", BASE_TAG).returncode == 0:
        return {"base": BASE_TAG, "made": False, "seconds": 0.0}
    start = time.monotonic()
    env = dict(os.environ, BASE_LOG=str(log_dir / "debootstrap.log"), DOCKER=engine.docker,
               PATH=f"{Path(engine.docker).parent}:{os.environ.get('PATH', '')}")
    r = subprocess.run([str(REPO / "scripts" / "make_debian_base.sh"), BASE_TAG], capture_output=True,
                       text=True, env=env, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"making the base image failed:\n{r.stdout}\n{r.stderr}")
    return {"base": BASE_TAG, "made": True, "seconds": round(time.monotonic() - start, 1)}


def build_cpu_image(engine: Engine, log_dir: Path, tag: str = CPU_IMAGE,
                    extra_args: list[str] | None = None) -> dict:
    """`make image-cpu`'s build, against the local base; returns timing and size."""
    digest = series_digest()
    cmd = ["build", "--progress=plain", "--network", "host", "--build-arg", "FLAVOUR=cpu",
           "--build-arg", f"CPU_BASE={BASE_TAG}", "--build-arg", f"OVERLAY_DIGEST={digest}",
           "-t", tag, *(extra_args or [])]
    ca = ca_bundle()
    if ca:
        cmd += ["--secret", f"id=ca,src={ca}"]
    start = time.monotonic()
    r = engine.run(*cmd, str(REPO), timeout=3600, env=dict(os.environ, DOCKER_BUILDKIT="1"))
    seconds = time.monotonic() - start
    (log_dir / "image-cpu-build.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
        raise RuntimeError(f"docker build of the cpu image failed ({r.returncode}):\n{tail}")
    info = json.loads(engine.run("image", "inspect", tag, check=True).stdout)[0]
    return {"image": tag, "build_seconds": round(seconds, 1), "size_bytes": info["Size"],
            "labels": info["Config"].get("Labels") or {}, "overlay_digest": digest}
