"""Stack dumps on demand for every Python process of a served engine (API server, engine core,
workers), so that a start-up that hangs can be seen from its log.

``scripts/servertools.py`` puts this folder first on ``PYTHONPATH`` of the ``vllm serve`` it starts
and sets ``DDTREE_STACKS_ON_SIGUSR1=1``. Python imports ``sitecustomize`` in every interpreter it
starts (also the ones vLLM spawns), so each of them registers a C-level faulthandler for SIGUSR1:
all threads' Python stacks go to the process's stderr (fd 2, the server log) even while the main
thread is stuck inside a long C call (a kernel compile, a device sync), where a Python-level signal
handler would never run. Each armed process also leaves a file named by its pid in
``DDTREE_STACKS_REGISTRY`` (a folder servertools made), so that exactly these processes are signalled
(SIGUSR1 would kill any other; vLLM renames its processes with setproctitle, which also hides their
environment from /proc, so the registry is the reliable way to know). ``DDTREE_STACKS_EVERY_S=N``
additionally dumps every N seconds (a timeline of where a slow start spends its time), for the first
``DDTREE_STACKS_FOR_S`` seconds of the process (default 600), so a long benchmark after the start
does not fill the log.

Without ``DDTREE_STACKS_ON_SIGUSR1`` this module only hands over to the next ``sitecustomize`` on
``sys.path`` (Debian/Ubuntu ship one), which it always does, so shadowing it changes nothing else.
"""

import os
import sys


def _register() -> None:
    import faulthandler
    import signal

    if os.environ.get("DDTREE_STACKS_ON_SIGUSR1") == "1" and hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
        registry = os.environ.get("DDTREE_STACKS_REGISTRY")
        if registry and os.path.isdir(registry):
            def enrol() -> None:
                try:
                    with open(os.path.join(registry, str(os.getpid())), "w") as f:
                        f.write(" ".join(sys.argv)[:500])
                except OSError:
                    pass

            enrol()
            # a forked child keeps the handler (and needs no import): enrol it as well
            os.register_at_fork(after_in_child=enrol)
    every = os.environ.get("DDTREE_STACKS_EVERY_S")
    if every:
        import threading

        faulthandler.dump_traceback_later(float(every), repeat=True, file=sys.stderr)
        stop = threading.Timer(float(os.environ.get("DDTREE_STACKS_FOR_S", "600")),
                               faulthandler.cancel_dump_traceback_later)
        stop.daemon = True
        stop.start()


def _chain_next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


try:
    _register()
except Exception as exc:  # a diagnostics aid must never stop an interpreter from starting
    print(f"ddtree stack dumps not armed: {type(exc).__name__}: {exc}", file=sys.stderr)
try:
    _chain_next_sitecustomize()
except Exception:
    pass
