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

The periodic dumps are taken by a Python thread under the GIL (``sys._current_frames``), not by
``faulthandler.dump_traceback_later``: faulthandler's watchdog thread reads the other threads' frames
without the GIL, and on CPython 3.12 that segfaults a process whose threads are busy (cpython
#131580, #140815). It killed two vLLM engine cores on the H100 on 24 Nov 2026 (each log ends
mid-dump, then "engine core exited unexpectedly"), very likely the DDTree one of 23 Nov as well
(``docs/ddtree-server-crash-2026-11-23.md``). The price: a process stuck in a C call that holds
the GIL gets no periodic dump; the on-demand SIGUSR1 dump (faulthandler, once, on a start that
already timed out) still sees it.

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
        every_s, for_s = float(every), float(os.environ.get("DDTREE_STACKS_FOR_S", "600"))
        _start_periodic_dumps(every_s, for_s)
        # a forked child has no copy of the thread: start its own timeline
        os.register_at_fork(after_in_child=lambda: _start_periodic_dumps(every_s, for_s))


def format_all_stacks(skip_ident=None) -> str:
    """Every thread's Python stack, most recent call first (faulthandler's layout). Called with
    the GIL held, so no frame changes while it is read."""
    import threading
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    out = [f"Stacks of pid {os.getpid()} (periodic, DDTREE_STACKS_EVERY_S):"]
    for ident, frame in sys._current_frames().items():
        if ident == skip_ident:
            continue
        out.append(f"Thread {ident:#x} [{names.get(ident, '?')}] (most recent call first):")
        out += [f'  File "{fs.filename}", line {fs.lineno} in {fs.name}'
                for fs in reversed(traceback.extract_stack(frame))]
    return "\n".join(out) + "\n\n"


def _start_periodic_dumps(every: float, for_s: float) -> None:
    import threading
    import time

    def loop() -> None:
        me = threading.get_ident()
        end = time.monotonic() + for_s
        while True:
            time.sleep(every)
            if time.monotonic() > end:
                return
            try:
                os.write(2, format_all_stacks(skip_ident=me).encode("utf-8", "replace"))
            except Exception:  # a diagnostics aid must never take the process down
                return

    threading.Thread(target=loop, name="ddtree-stacks", daemon=True).start()


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
