"""Fixes for vLLM's NIXL P/D on CPU hosts, loaded into the baseline's processes
through PYTHONPATH by `tandem bench compare` (the "vllm-nixl-fixed" system).
Both change only where and how often threads run, never what the engine computes:

1. vLLM's NIXL worker calls os.sched_setaffinity(0, [last core of each NUMA
   node]) on CPU hosts, which moves the thread that runs the forward pass off
   the cores the server was given (VLLM_CPU_OMP_THREADS_BIND) onto the last
   core of the machine, usually the other server's. Here a thread's affinity
   may only narrow: cores outside its current set are dropped, and a request
   left with none changes nothing.
2. NIXL's agent starts a progress thread that polls UCX without pause
   (nixl._api sets its delay, pthrDelay, to 0) and keeps a whole core at 100%
   even when idle. The thread stays (turning it off stalls transfers: the
   prefill side then progresses UCX only when its engine steps, and an idle
   prefill engine does not step), but sleeps PROGRESS_DELAY_US between polls.
"""

from __future__ import annotations

import os
import sys

PROGRESS_DELAY_US = int(os.environ.get("TANDEM_NIXL_PROGRESS_DELAY_US", "100"))
_set_affinity = os.sched_setaffinity


def _narrowing_setaffinity(pid: int, cpus) -> None:  # type: ignore[no-untyped-def]
    allowed = set(os.sched_getaffinity(pid))
    wanted = set(cpus) & allowed
    if wanted and wanted != allowed:
        _set_affinity(pid, wanted)
    if set(cpus) - allowed:
        print(f"[nixl-fixes] pid {os.getpid()}: kept affinity {sorted(wanted or allowed)} instead of "
              f"{sorted(set(cpus))}", file=sys.stderr, flush=True)


os.sched_setaffinity = _narrowing_setaffinity

# vLLM sets this before it imports NIXL itself and warns when NIXL came first.
os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
try:
    import nixl._api as _nixl_api
except ImportError:  # not a process that uses NIXL
    pass
else:
    _bindings = _nixl_api.nixlBind
    _delay = _bindings.nixlAgentConfig.pthrDelay

    class _PoliteProgressConfig(_bindings.nixlAgentConfig):  # type: ignore[misc, name-defined]
        """nixl._api sets pthrDelay = 0 (poll without pause); keep at least PROGRESS_DELAY_US."""

        pthrDelay = property(_delay.fget, lambda self, us: _delay.fset(self, max(int(us), PROGRESS_DELAY_US)))

    _bindings.nixlAgentConfig = _PoliteProgressConfig
