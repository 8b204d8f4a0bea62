"""`tandem coordinator --workers N`: N coordinator processes behind one gRPC and one HTTP address.

One coordinator process tops out at one core (Python, grpc.aio). With ``--workers N``
the command becomes a small supervisor that starts N coordinator processes with the
same flags on the same two ports (SO_REUSEPORT: the kernel spreads new connections
over them), prints one TANDEM_READY line when all of them are ready, restarts one
that dies, and passes SIGINT / SIGTERM on to all (each drains as a single
coordinator does). The workers share nothing but etcd: each keeps its own
membership view, router and admission, as separate coordinators do (the nodes'
reported load is what every one of them sees of the others' requests).

Metrics: the workers write their series to one directory (prometheus_client's
multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), so /metrics on the shared HTTP
port, whichever worker answers, is the sum over all of them (counters and
histograms summed, the coordinator's gauges summed over live workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORKER_ENV = "TANDEM_COORDINATOR_WORKER"  # set in each worker: its index
READY = "TANDEM_READY"
START_TIMEOUT_S = 300.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


def worker_index() -> int | None:
    raw = os.environ.get(WORKER_ENV)
    return int(raw) if raw and raw.isdigit() else None


_LIBC = None  # loaded in the supervisor: a child between fork and exec only calls into it


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the supervisor dies
    PR_SET_PDEATHSIG = 1
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = {**env, WORKER_ENV: str(index)}
        self.proc: subprocess.Popen[str] | None = None
        self.ready = threading.Event()
        self.info = ""
        self.restarts = 0

    def start(self) -> None:
        self.ready.clear()
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, env=self.env,
                                     preexec_fn=_die_with_parent, process_group=0)
        threading.Thread(target=self._pump, args=(self.proc,), name=f"worker-{self.index}", daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY):
                self.info = line.strip()
                self.ready.set()
                if self.restarts:
                    print(f"tandem coordinator: worker {self.index} ready again (pid {proc.pid})", file=sys.stderr,
                          flush=True)
            else:
                sys.stdout.write(line)
                sys.stdout.flush()


def run_workers(n: int, argv: list[str], host: str, grpc_port: int, http_port: int) -> int:
    """Start and supervise ``n`` workers of ``tandem coordinator`` ``argv`` (its flags as given)."""
    from tandem.netutil import free_port

    global _LIBC
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
    grpc_port = grpc_port or free_port(host)
    http_port = http_port or free_port(host)
    metrics_dir = tempfile.mkdtemp(prefix="tandem-coordinator-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    # The flags as given, then the shared ports and one worker each (argparse: the last one wins).
    cmd = [sys.executable, "-m", "tandem.cli", "coordinator", *argv, "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), "--workers", "1"]
    workers = [_Worker(i, cmd, env) for i in range(n)]
    stopping = threading.Event()
    signalled: set[int] = set()  # pids told to stop (once each: a second signal stops a coordinator hard)

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        for w in workers:
            if w.proc is not None and w.proc.poll() is None and w.proc.pid not in signalled:
                signalled.add(w.proc.pid)
                w.proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for w in workers:
            while not w.ready.wait(0.2):
                if stopping.is_set():
                    return 130
                if w.proc is not None and w.proc.poll() is not None:
                    print(f"tandem coordinator: worker {w.index} exited with code {w.proc.returncode} while "
                          "starting; stopping the others", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"tandem coordinator: worker {w.index} not ready after {START_TIMEOUT_S:.0f} s",
                          file=sys.stderr)
                    return 1
        first = workers[0].info.split()
        fields = dict(kv.split("=", 1) for kv in first[1:] if "=" in kv)
        print(f"{READY} role=coordinator grpc={fields.get('grpc', f'{host}:{grpc_port}')} "
              f"http={fields.get('http', f'http://{host}:{http_port}')} workers={n}", flush=True)
        return _supervise(workers, stopping, signalled, metrics_dir)
    finally:
        for w in workers:  # those not told yet (told twice, a coordinator stops hard)
            if w.proc is not None and w.proc.poll() is None and w.proc.pid not in signalled:
                w.proc.terminate()
        for w in workers:
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(workers: list[_Worker], stopping: threading.Event, signalled: set[int], metrics_dir: str) -> int:
    """Until a stop signal: a worker that exits is started again (after a pause that grows with
    its restarts); its live gauges are dropped from the shared metrics."""
    from prometheus_client import multiprocess

    while not stopping.wait(0.5):
        for w in workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            dead, code = w.proc.pid, w.proc.returncode
            w.proc = None  # seen: its exit is not the stop's
            multiprocess.mark_process_dead(dead, metrics_dir)
            pause = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
            print(f"tandem coordinator: worker {w.index} (pid {dead}) exited with code {code}; "
                  f"starting it again in {pause:.0f} s", file=sys.stderr, flush=True)
            if stopping.wait(pause):
                break
            w.restarts += 1
            w.start()
    for w in workers:  # one started while the signal came was not there to get it
        if w.proc is not None and w.proc.poll() is None and w.proc.pid not in signalled:
            signalled.add(w.proc.pid)
            w.proc.terminate()
    codes = []
    for w in workers:
        if w.proc is not None:
            try:
                codes.append(w.proc.wait(timeout=120))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                codes.append(1)
    return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1


def metrics_page() -> bytes | None:
    """The sum over every worker's metrics, in a worker; None in a single coordinator."""
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not d or not Path(d).is_dir():
        return None
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=d)
    return generate_latest(registry)
