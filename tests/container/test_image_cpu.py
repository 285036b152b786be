"""The cpu image, built and run for real: labels, layout, non-root user, the entrypoint's refusals,
and PROFILE=baseline / dflash / ddtree served to the openai client from a container (greedy ddtree and
dflash equal baseline under the team's bf16 rule), HEALTHCHECK turning healthy and `docker stop`
ending the server within the grace period."""

from __future__ import annotations

import json
import shutil
import time
import uuid

import pytest

from servertools import free_port, greedy_completions, parse_prometheus, spec_decode_stats
from tests.support.equality import compare_greedy
from tests.support.prompts import token_prompts

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PROMPT_LENGTHS = [10, 17, 31, 48, 75, 128, 200, 300]
MAX_TOKENS = 24
STOP_GRACE_S = 30
UID = "10001"


def _site(engine, image) -> str:
    r = engine.run("run", "--rm", "--entrypoint", "/opt/venv/bin/python", image, "-c",
                   "import sysconfig; print(sysconfig.get_paths()['purelib'])", check=True)
    return r.stdout.strip()


def test_labels_layout_and_overlays(docker_engine, cpu_image):
    image = cpu_image["image"]
    labels = cpu_image["labels"]
    assert labels["org.ddtree-vllm.flavour"] == "cpu"
    assert labels["org.ddtree-vllm.vllm-commit"] == "ffd46bfab2128bb84146050e98b51a617c6575ab"
    assert labels["org.ddtree-vllm.overlay-digest"] == cpu_image["overlay_digest"]
    assert labels["org.ddtree-vllm.default-profile"] == "ddtree"
    config = json.loads(docker_engine.run("image", "inspect", image, check=True).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Healthcheck"]["Test"][-1].endswith("container/healthcheck.py")
    site = _site(docker_engine, image)
    r = docker_engine.run("run", "--rm", "--entrypoint", "/opt/venv/bin/python", image,
                          "scripts/apply_overlays.py", "--tree", site, "--check", "--require-applied")
    assert r.returncode == 0, r.stdout + r.stderr
    r = docker_engine.run("run", "--rm", "--entrypoint", "/opt/venv/bin/python", image, "-c",
                          "import os, ddtree, ddtree.tree, vllm.config.ddtree; print(os.getuid())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == UID  # vLLM logs to stdout on import
    # The CA bundle went in as a BuildKit secret: nothing of it in the image or its history.
    r = docker_engine.run("run", "--rm", "--entrypoint", "/bin/sh", image, "-c", "test ! -e /run/secrets/ca")
    assert r.returncode == 0
    hist = docker_engine.run("history", "--no-trunc", image, check=True).stdout
    assert "BEGIN CERTIFICATE" not in hist


def test_unknown_profile_exits_nonzero(docker_engine, cpu_image):
    r = docker_engine.run("run", "--rm", "-e", "PROFILE=nope", cpu_image["image"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "unknown PROFILE 'nope'" in r.stderr
    assert "ddtree" in r.stderr and "baseline" in r.stderr  # names the known ones


def test_missing_target_exits_nonzero(docker_engine, cpu_image):
    r = docker_engine.run("run", "--rm", "-e", "PROFILE=baseline", cpu_image["image"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "target model folder /models/target does not exist" in r.stderr


def test_mismatched_drafter_exits_nonzero(docker_engine, cpu_image, served_models, log_dir):
    tiny_models = served_models
    bad = log_dir / "bad-drafter"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(tiny_models / "drafter", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["target_hidden_size"] = cfg["hidden_size"] * 2
    cfg["dflash_config"]["target_layer_ids"] = [1, 7]
    (bad / "config.json").write_text(json.dumps(cfg))
    bad.chmod(0o755)
    r = docker_engine.run("run", "--rm", "-e", "PROFILE=ddtree",
                          "-v", f"{tiny_models / 'target'}:/models/target:ro",
                          "-v", f"{bad}:/models/dflash-drafter:ro", cpu_image["image"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "target_hidden_size 256 != target hidden_size 128" in r.stderr
    assert "[7] not in 0..3" in r.stderr
    assert "does not match target" in r.stderr


def test_unreadable_weights_exit_nonzero(docker_engine, cpu_image, tiny_models, log_dir):
    """The image runs as uid 10001: weights it cannot read are named before vLLM starts."""
    locked = log_dir / "locked-target"
    shutil.rmtree(locked, ignore_errors=True)
    shutil.copytree(tiny_models / "target", locked)
    locked.chmod(0o755)
    (locked / "model.safetensors").chmod(0o600)
    r = docker_engine.run("run", "--rm", "-e", "PROFILE=baseline", "-v", f"{locked}:/models/target:ro",
                          cpu_image["image"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "target model files not readable as uid 10001: /models/target/model.safetensors" in r.stderr


def test_dry_run_prints_the_command(docker_engine, cpu_image):
    r = docker_engine.run("run", "--rm", "-e", "PROFILE=ddtree", "-e", "DRY_RUN=1", "-e", "DDTREE_BUDGET=48",
                          cpu_image["image"], timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("vllm serve /models/target ")
    for piece in ("--language-model-only", "--enforce-eager", "--no-enable-prefix-caching",
                  "dflash_ddtree", "ddtree_budget\\\":\\ 48", "/models/dflash-drafter"):
        assert piece in out, (piece, out)


# ------------------------------------------------------------------------------ serving


class Served:
    """One `docker run -d` of the image with the tiny models at /models."""

    def __init__(self, engine, image, tiny_models, profile, log_dir, env=None):
        self.engine = engine
        self.log_path = log_dir / f"container-{profile}.log"
        self.name = f"ddtree-test-{profile}-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = ["run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000",
                "--health-interval", "3s", "--health-timeout", "5s",
                "-v", f"{tiny_models / 'target'}:/models/target:ro",
                "-v", f"{tiny_models / 'drafter'}:/models/dflash-drafter:ro",
                "-e", f"PROFILE={profile}", "-e", "SEED=0"]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        engine.run(*args, image, check=True)

    def state(self) -> dict:
        return json.loads(self.engine.run("inspect", "--format", "{{json .State}}", self.name,
                                          check=True).stdout)

    def wait_healthy(self, timeout: float = 900) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            st = self.state()
            if not st["Running"]:
                self.log_path.write_text(self.logs())
                raise RuntimeError(f"{self.name} exited ({st['ExitCode']}), log {self.log_path}:\n"
                                   f"{self.logs()[-3000:]}")
            if (st.get("Health") or {}).get("Status") == "healthy":
                return time.monotonic() - start
            time.sleep(2)
        self.log_path.write_text(self.logs())
        raise TimeoutError(f"{self.name} not healthy after {timeout}s, log {self.log_path}")

    def logs(self) -> str:
        r = self.engine.run("logs", self.name)
        return r.stdout + r.stderr

    def pid1_uid(self) -> str:
        status = self.engine.run("exec", self.name, "cat", "/proc/1/status", check=True).stdout
        return next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))

    def metrics(self) -> dict:
        import urllib.request
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            return parse_prometheus(r.read().decode())

    def stop(self) -> dict:
        start = time.monotonic()
        self.engine.run("stop", "-t", str(STOP_GRACE_S), self.name, timeout=STOP_GRACE_S + 60)
        seconds = time.monotonic() - start
        st = self.state()
        return {"seconds": seconds, "exit_code": st["ExitCode"], "oom": st["OOMKilled"],
                "logs": self.logs()}

    def remove(self) -> None:
        self.engine.run("rm", "-f", self.name)


def _complete_all(base_url, prompts, logprobs):
    from openai import OpenAI

    model = OpenAI(base_url=base_url + "/v1", api_key="EMPTY").models.list().data[0].id
    assert model == "/models/target"
    return greedy_completions(base_url, prompts, MAX_TOKENS, logprobs, timeout=300)


def _serve(engine, image, tiny_models, profile, prompts, log_dir, logprobs=None, env=None):
    """Run one container through its whole life; returns what the test asserts on."""
    srv = Served(engine, image, tiny_models, profile, log_dir, env)
    try:
        healthy_s = srv.wait_healthy()
        uid = srv.pid1_uid()
        outs = _complete_all(srv.base_url, prompts, logprobs)
        stats = spec_decode_stats(srv.metrics())
        stop = srv.stop()
        srv.log_path.write_text(stop.pop("logs"))
        return {"profile": profile, "healthy_s": round(healthy_s, 1), "uid": uid, "outs": outs,
                "spec": stats, "stop": stop}
    finally:
        srv.remove()


@pytest.fixture(scope="module")
def served_models(tiny_models):
    """The tiny models, readable by the image's uid 10001 (safetensors writes its files 0600)."""
    for p in [tiny_models, *tiny_models.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o555 if p.is_dir() else 0o444))
    return tiny_models


@pytest.fixture(scope="module")
def prompts(tiny_models):
    return token_prompts(tiny_models / "tokenizer", PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def baseline(docker_engine, cpu_image, served_models, prompts, log_dir):
    return _serve(docker_engine, cpu_image["image"], served_models, "baseline", prompts, log_dir,
                  logprobs=2, env={"EXTRA_ARGS": "--logprobs-mode raw_logits --max-logprobs 4"})


def _check_life(run):
    assert run["uid"] == UID, f"PID 1 runs as uid {run['uid']}"
    stop = run["stop"]
    assert not stop["oom"]
    assert stop["seconds"] < STOP_GRACE_S, f"docker stop took {stop['seconds']:.1f}s (SIGKILL at {STOP_GRACE_S})"
    assert stop["exit_code"] in (0, 143), f"exit code {stop['exit_code']} after docker stop"


def test_baseline_serves(baseline):
    _check_life(baseline)
    assert all(len(toks) == MAX_TOKENS for toks, _ in baseline["outs"])
    assert baseline["spec"]["drafts"] == 0


@pytest.mark.parametrize("profile", ["dflash", "ddtree"])
def test_spec_profile_equals_baseline(profile, docker_engine, cpu_image, served_models, prompts, baseline,
                                      log_dir):
    run = _serve(docker_engine, cpu_image["image"], served_models, profile, prompts, log_dir)
    _check_life(run)
    verdicts = [compare_greedy(ref, top2, out) for (ref, top2), (out, _) in zip(baseline["outs"], run["outs"])]
    report = {"profile": profile, "healthy_s": run["healthy_s"], "baseline_healthy_s": baseline["healthy_s"],
              "stop": run["stop"], "spec": run["spec"],
              "identical": sum(v.identical for v in verdicts), "prompts": len(verdicts),
              "ties": [v.detail for v in verdicts if not v.identical]}
    (log_dir / f"container-equality-{profile}.json").write_text(json.dumps(report, indent=2))
    bad = [f"prompt {i}: {v.detail}" for i, v in enumerate(verdicts) if not v.ok]
    assert not bad, "\n".join(bad)
    assert run["spec"]["drafts"] > 0, f"{profile}: no speculative steps: {run['spec']}"
