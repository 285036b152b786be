"""Start and stop a real ``vllm serve`` on 127.0.0.1, and read what it reports.

Used by the end-to-end tests and by ``scripts/demo.py``. Standard library only, so it runs in any
environment that has vLLM installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Holds the ``sitecustomize`` that arms stack dumps in every Python process of a server (see there).
STACKDUMP_DIR = REPO / "scripts" / "stackdump"
#: Set in a server's environment: its Python processes dump all thread stacks to the log on SIGUSR1.
STACKS_ENV = "DDTREE_STACKS_ON_SIGUSR1"
#: A folder where each armed process leaves a file named by its pid.
STACKS_REGISTRY_ENV = "DDTREE_STACKS_REGISTRY"

#: Flags every CPU run of the tiny hybrid target needs (see ../shared/reference/cpu-vllm.md):
#: language_model_only for the Qwen3.5 layout, eager mode for a fast start, no prefix caching (hybrid
#: + speculative decoding + prefix caching crashes in vLLM 0.26's CPU path).
CPU_TINY_FLAGS = [
    "--language-model-only",
    "--enforce-eager",
    "--max-model-len", "4096",
    "--no-enable-prefix-caching",
    "--max-num-seqs", "8",
    "--seed", "0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> list[str]:
    """`vllm` run by this interpreter (the console script's shebang may name another venv)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The test suite sets TRITON_INTERPRET=1 for its own kernels; a served engine runs as in production.
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(REPO / "build" / "vllm-cache"))
    # Triton prints one line per autotuned kernel with the seconds its tuning took: on a GPU host
    # with a cold cache the FLA (GDN prefill) autotuning inside vLLM's profile run takes minutes,
    # and this is how the server log shows it (docs/ddtree-vllm.md, "Server start-up time")
    env.setdefault("TRITON_PRINT_AUTOTUNING", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if extra:
        env.update(extra)
    if env.get(STACKS_ENV, "1") == "1":
        # first on the path, so that its sitecustomize is the one Python imports (it chains on)
        env[STACKS_ENV] = "1"
        env["PYTHONPATH"] = os.pathsep.join((str(STACKDUMP_DIR), env["PYTHONPATH"]))
    return env


def _proc_group_members(pgid: int) -> list[int]:
    """Live processes of a process group, from /proc (Linux); [] where /proc is missing."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            out.append(int(d.name))
    return sorted(out)


def fresh_prometheus_dir() -> str:
    """A new PROMETHEUS_MULTIPROC_DIR, so the engine core's metrics (DDTree's among them) reach
    the API server's /metrics."""
    import tempfile
    return tempfile.mkdtemp(prefix="vllm-prom-")


class VllmServer:
    """``vllm serve MODEL`` in its own process session, logging to a file."""

    def __init__(self, model: str | Path, args: list[str], log_path: Path,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.model = str(model)
        self.args = list(args)
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.env = server_env(env)
        if not (env and "PROMETHEUS_MULTIPROC_DIR" in env):
            self.env["PROMETHEUS_MULTIPROC_DIR"] = fresh_prometheus_dir()
        if self.env.get(STACKS_ENV) == "1":
            import tempfile
            self.env[STACKS_REGISTRY_ENV] = tempfile.mkdtemp(prefix="vllm-stacks-")
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*vllm_executable(), "serve", self.model, "--host", "127.0.0.1",
                "--port", str(self.port), *self.args]

    def start(self, timeout: float = 300.0, health_path: str = "/health") -> "VllmServer":
        """Start and wait until ``health_path`` answers 200. On a timeout, every Python process of
        the server first dumps its thread stacks into the log (``dump_stacks``), then it is
        stopped and TimeoutError raised with the log's tail."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # append mode: the server's processes and our own notes (dump_stacks) never overwrite
        # each other in the shared log
        open(self.log_path, "wb").close()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was "
                                   f"ready; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + health_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        dumped = self.dump_stacks()
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s (stacks of {len(dumped)} "
                           f"processes dumped into {self.log_path}); log tail:\n{self.log_tail()}")

    def note(self, text: str) -> None:
        """Append a line of our own to the server log."""
        with open(self.log_path, "ab") as f:
            f.write(f"[servertools {time.strftime('%H:%M:%S')}] {text}\n".encode())

    def dump_stacks(self, settle: float = 2.0) -> list[int]:
        """Ask every armed Python process of the server (its process group) to write all thread
        stacks into the log, one process at a time under a header naming it; returns their pids.
        Needs the server started with stack dumps armed (the default of ``server_env``)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        if self.env.get(STACKS_ENV) != "1":
            self.note(f"no stack dump: {STACKS_ENV} is off for this server")
            return []
        registry = Path(self.env[STACKS_REGISTRY_ENV])
        armed = {int(f.name) for f in registry.iterdir() if f.name.isdigit()}
        members = _proc_group_members(self.proc.pid)
        dumped = []
        # only processes of this server (its process group, where /proc tells) that armed the handler
        for pid in sorted(armed & set(members) if members else armed):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                cmdline = cmdline.decode(errors="replace").strip()
            except OSError:
                cmdline = (registry / str(pid)).read_text(errors="replace")
            self.note(f"stacks of pid {pid} ({cmdline[:300]}) follow")
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            dumped.append(pid)
            time.sleep(settle / 4)  # one process's dump at a time, so the log stays readable
        time.sleep(settle)
        self.note(f"end of stack dumps ({len(dumped)} processes)")
        return dumped

    def stop(self, grace: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def alive(self) -> bool:
        """The server process is still running (an engine that died takes the API server down
        within seconds; until then /metrics may still answer)."""
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        """Prometheus samples from /metrics as {'name{labels}': value} (counters summed by name too)."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            return parse_prometheus(r.read().decode())


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN|[+-]Inf)$")


def log_excerpt(text: str, tail: int = 400, after_first_error: int = 300) -> str:
    """A server log cut for keeping: its last ``tail`` lines, preceded by the lines around its first
    error. When the engine dies, the API server echoes one traceback per pending request, which
    pushes the engine's own traceback (the cause) far out of any tail."""
    lines = text.splitlines()
    if len(lines) <= tail:
        return text if text.endswith("\n") or not text else text + "\n"
    first = next((i for i, ln in enumerate(lines)
                  if "Traceback (most recent call last)" in ln or " ERROR " in ln), None)
    head: list[str] = []
    cut_at = len(lines) - tail
    if first is not None and first < cut_at:
        start, stop = max(0, first - 20), min(first + after_first_error, cut_at)
        head = ([f"[log_excerpt: lines {start + 1}-{stop} of {len(lines)}, from the first error]"]
                + lines[start:stop] + [f"[log_excerpt: {cut_at - stop} lines cut; the last {tail} follow]"])
    else:
        head = [f"[log_excerpt: the last {tail} of {len(lines)} lines]"]
    return "\n".join(head + lines[-tail:]) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        out[name] = out.get(name, 0.0) + value if labels else value
    return out


def spec_decode_stats(metrics: dict[str, float]) -> dict[str, float]:
    """Acceptance figures from vLLM's spec-decode counters."""
    drafts = metrics.get("vllm:spec_decode_num_drafts_total", 0.0)
    draft_tokens = metrics.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    per_pos = {}
    for k, v in metrics.items():
        m = re.match(r'vllm:spec_decode_num_accepted_tokens_per_pos_total\{.*position="(\d+)".*\}', k)
        if m:
            per_pos[int(m.group(1))] = v
    return {
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted,
        # mean tokens committed per verify step (accepted drafts + the bonus token)
        "acceptance_length": (1.0 + accepted / drafts) if drafts else 0.0,
        "accepted_per_position": [per_pos[i] for i in sorted(per_pos)],
    }


def ddtree_lines(log_text: str, limit: int = 8) -> list[str]:
    """The server's own DDTree lines (which path runs: tree verify or the chain fallback; stats)."""
    out = []
    for line in log_text.splitlines():
        msg = line.split("] ", 1)[-1]
        if msg.startswith(("dflash_ddtree", "DDTree")):
            out.append(msg[:400])
    return out[:limit]


def engine_error_lines(log_text: str, limit: int = 300) -> list[str]:
    """The engine core's own failure (its first ERROR line and the traceback after it), which the
    API server's EngineDeadError lines only point to ("See stack trace (above)"). A busy server
    logs one EngineDeadError traceback per in-flight request after it, so a log tail alone loses
    it. Lines of the engine-core process only ("(EngineCore..." prefix); [] when there is none."""
    lines = log_text.splitlines()
    first = next((i for i, l in enumerate(lines)
                  if l.startswith("(EngineCore") and (" ERROR " in l or "Traceback" in l)), None)
    if first is None:
        return []
    return [l for l in lines[first:] if l.startswith("(EngineCore")][:limit]


def greedy_completions(base_url: str, prompts: list[list[int]], max_tokens: int,
                       logprobs: int | None = None, concurrency: int = 4, timeout: float = 600):
    """Greedy completions of token-id prompts through the openai client, as (token ids, top
    candidates) per prompt; the candidates are [(token id, value)] per position when ``logprobs`` is
    set (raw logits with ``--logprobs-mode raw_logits``), else None."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="EMPTY", timeout=timeout)
    model = client.models.list().data[0].id

    def one(p):
        r = client.completions.create(
            model=model, prompt=p, max_tokens=max_tokens, temperature=0.0, logprobs=logprobs,
            extra_body={"ignore_eos": True, "return_token_ids": True,
                        "return_tokens_as_token_ids": True})
        c = r.choices[0]
        top = None
        if logprobs:
            top = [[(int(k.split(":", 1)[1]), v) for k, v in d.items()]
                   for d in c.logprobs.top_logprobs]
        return list(c.token_ids), top

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def speculative_args(spec: dict | None) -> list[str]:
    return [] if spec is None else ["--speculative-config", json.dumps(spec)]
