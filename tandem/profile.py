"""A node's startup profile: its engine's prefill and decode timings, measured once and cached.

Before a node registers, it runs a short set of requests through its own
engine (prefills of several prompt lengths; decode batches of several sizes
and context lengths) through the same ``NodePerf`` that fits its timings
while it serves, so the coordinator can predict its TTFT and TPOT from its
first request on. The fitted statistics are cached in a file keyed by what
the timings depend on: the model's files, the hardware the node runs on
(CPU model and core count, or GPU name), the engine settings and the
versions. A restart, a second node of the same kind or the next test run
finds the file and skips the profile; any change of those keys profiles
again. A node's startup profile has no KV transfer timings (the decode node
fits them from its first fetches, see tandem/node/perf.py); `tandem profile`
(tandem/profile_cmd.py) writes the same file with them added.

Modes (``--profile``): ``auto`` uses the cached file or profiles and writes
one; ``fresh`` always profiles and rewrites it; ``off`` starts with an empty
model (the node is then predicted only after it has served some requests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import platform
import random
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tandem import __version__
from tandem.kvtransfer.handle import NO_STORE
from tandem.local.model import GENERATOR
from tandem.node.perf import EngineClock, NodePerf
from tandem.perfmodel import VLLM_STEP_TOKENS, NodeModel
from tandem.sampling import Sampling

logger = logging.getLogger(__name__)

# 2: decode steps timed on the engine's clock, each stream out of the batch at its own end, and a
# batch of 32 (version 1's short runs read a batch's steps 2x too cheap: its tail was counted whole)
# 3: prefills after a cached prefix too (their new tokens attend to it: perfmodel.py's form)
# 4: a decode step is one sample, not one per stream in it (node/perf.py); counted per stream, the
# batch of 32's steps outweighed the small batches measured before them and, through the fit's
# half-life, erased them
# 5: large batches at long contexts too (16 x 512, 32 x 384), the corner a loaded node decodes in
# 6: the decode fit's hinge past a batch of 4 (perfmodel.py's ``decode_features``)
PROFILE_VERSION = 6
MODES = ("auto", "fresh", "off")
PREFILL_LENGTHS = (16, 64, 128, 256, 512, 1024, 2048)
PREFILL_REPEATS = 2
# (cached prefix, new tokens): prefills after a prefix the engine holds, each run twice (a new
# prefix each time), so that the fit tells the new tokens' attention to the cached ones apart
PREFIX_RUNS = ((256, 32), (512, 128), (1024, 64), (1024, 256), (1536, 32))
# (batch, prompt tokens): batches of several sizes and contexts, so that the decode fit can tell
# the per-request cost from the per-context-token cost. The last two are where a loaded node
# decodes (a chat run at 1:1: 16-20 streams of ~450 tokens each); without them the runs' long
# contexts came at small batches only, and the fit's context term was a guess there: profiled
# twice in a row on the bench model, 1.42 us a context token without, 1.63 with, where 16
# streams on a 1:1 cluster stepped 2.0 us a token slower as their contexts grew from 510 to
# 1,432 tokens each (39.8 -> 69.0 ms; 32.1 -> 53.1 predicted without them, 34.9 -> 58.9 with).
# They add ~15 s to a profile of the bench model on one core.
DECODE_RUNS = ((1, 32), (1, 512), (4, 64), (4, 384), (8, 128), (16, 64), (8, 1024), (32, 64), (16, 512), (32, 384))
DECODE_STEPS = 12  # steps of each run's whole batch, after its last prompt
KV_SLACK_TOKENS = 32  # a stream's KV beyond its tokens (its last block's rest; the default block is 32)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "profiles"


def _model_identity(model_dir: str) -> list[object]:
    """What tells one model's files from another's: names, sizes and change times. A model Tandem
    seeded itself (its ``tandem_model.json`` names the generator, seed and shape) is that file's
    word and the sizes: every bench and validation run makes its own copy under its ``--out``,
    timed exactly alike, which change times alone would profile afresh each time."""
    root = Path(model_dir)
    seeded = None
    try:
        doc = json.loads((root / "tandem_model.json").read_text())
        seeded = doc if isinstance(doc, dict) and doc.get("generator") == GENERATOR else None
    except (OSError, ValueError):
        pass
    out: list[object] = [["tandem_model.json", seeded]] if seeded else []
    for p in sorted(root.iterdir()):
        if p.is_file() and not (seeded and p.name == "tandem_model.json"):
            st = p.stat()
            out.append([p.name, st.st_size] if seeded else [p.name, st.st_size, st.st_mtime_ns])
    return out


def _hardware(cores: int) -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # NVIDIA GPUs from the driver's own files (no CUDA call in this process).
    gpus = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            gpus += [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("Model:")]
        except OSError:
            pass
    return {"cpu": cpu, "cores": cores, "machine": platform.machine(), "gpus": gpus}


def profile_key(model_dir: str, settings: dict[str, object], cores: int) -> dict[str, object]:
    """Everything a node's timings depend on; a change of any of it means a new profile."""
    try:
        from vllm import __version__ as vllm_version
    except ImportError:  # unit tests without the engine
        vllm_version = "none"
    return {"profile_version": PROFILE_VERSION, "tandem": __version__, "vllm": vllm_version,
            "model": _model_identity(model_dir), "hardware": _hardware(cores), "settings": settings}


def node_settings(cfg: Any, engine: Any) -> dict[str, object]:
    """The engine settings a node's timings depend on (part of its profile's key)."""
    out: dict[str, object] = {
        "dtype": cfg.dtype, "block_size": engine.block_size, "max_model_len": engine.max_model_len,
        "max_num_seqs": cfg.max_num_seqs, "kv_cache_gib": cfg.kv_cache_gib,
        "max_num_batched_tokens": cfg.max_num_batched_tokens, "prefix_caching": cfg.enable_prefix_caching}
    engine_args = getattr(cfg, "engine_args", None)
    if engine_args:  # vLLM's own flags (parallelism, quantization, compilation) change timings too
        out["vllm_flags"] = json.dumps(engine_args, sort_keys=True, default=str)
    return out


def node_cores(cfg: Any) -> int:
    from tandem.node.config import parse_cores

    return len(parse_cores(cfg.cores)) if cfg.cores else len(os.sched_getaffinity(0))


def cache_file(cache_dir: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"profile-{digest}.json"


def load_cached(path: Path, key: dict[str, object]) -> NodeModel | None:
    """The cached model, or None when there is none or it is for something else or unreadable."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != json.loads(json.dumps(key)):
            return None
        return NodeModel.from_state(doc["model"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("profile cache %s is unreadable (%s); profiling again", path, exc)
        return None


def save(path: Path, key: dict[str, object], model: NodeModel, took_s: float) -> None:
    """Write atomically: a node killed mid-write leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"key": key, "model": model.state(), "took_s": round(took_s, 3),
                               "written_at": time.time()}, indent=1))
    os.replace(tmp, path)


class Profiler:
    """Runs the profile requests through an engine (anything with ``generate`` like EngineHost)."""

    def __init__(self, engine: Any, perf: NodePerf, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 progress: Callable[[str], None] = logger.info, seed: int = 0) -> None:
        self.engine = engine
        self.perf = perf
        self.vocab = vocab_size
        self.max_len = max_model_len
        self.max_seqs = max_num_seqs
        self.progress = progress
        self.rng = random.Random(seed)

    def _prompt(self, n: int) -> list[int]:
        # Fresh random ids every time: the engine's prefix cache must not shorten a prefill.
        return [self.rng.randrange(5, self.vocab) for _ in range(n)]

    async def _one(self, n: int, max_tokens: int,
                   on_output: Callable[[str, int, EngineClock | None], None] | None = None, rid: str = "",
                   ids: list[int] | None = None) -> tuple[int, int]:
        """Run one request (of ``ids``, or ``n`` fresh ones); (its cached prompt tokens, tokens
        produced). With ``on_output`` (a decode run) it is one of the node's prefills until its
        first token, as a served one is: the other streams' gaps that hold its prefill chunks are
        then not taken as decode steps."""
        rid = rid or f"profile-{uuid.uuid4().hex[:12]}"
        sampling = Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        cached = produced = 0
        with ExitStack() as prefilling:
            if on_output is not None:
                prefilling.enter_context(self.perf.prefill(n))
            # Not saved to the node's KV store: random prompts no one sends again.
            async for out in self.engine.generate(rid, ids or self._prompt(n), sampling, {NO_STORE: True}):
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                new = len(out.outputs[0].token_ids)
                produced += new
                if new:
                    prefilling.close()
                if on_output is not None:
                    on_output(rid, new, EngineClock.of(out))
        return cached, produced

    async def _stream(self, n: int, max_tokens: int) -> None:
        """One stream of a decode run: in the batch from its first token to its last (the batch is
        one smaller once it ends, whatever the others do: the streams that end first make the
        last steps smaller ones)."""
        rid = f"profile-{uuid.uuid4().hex[:12]}"
        self.perf.decode_started(rid, n)
        try:
            await self._one(n, max_tokens, self.perf.decode_output, rid)
        finally:
            self.perf.decode_ended(rid)

    async def run(self) -> None:
        lengths = [n for n in PREFILL_LENGTHS if n + 8 <= self.max_len] or [max(1, self.max_len // 2)]
        prefixed = [(h, n) for h, n in PREFIX_RUNS if h + n + 8 <= self.max_len]
        await self._one(lengths[0], 1)  # warm-up: first-call costs are not the node's speed
        total = len(lengths) * PREFILL_REPEATS + len(prefixed) + len(DECODE_RUNS)
        done = 0
        for n in lengths:
            for _ in range(PREFILL_REPEATS):
                with self.perf.prefill(n) as run:
                    cached, _ = await self._one(n, 1)
                    run.uncached_tokens = n - cached
                done += 1
            self.progress(f"profile {done}/{total}: prefill of {n} tokens")
        for h, n in prefixed:
            for _ in range(PREFILL_REPEATS):
                prefix = self._prompt(h)
                await self._one(h, 1, ids=prefix)  # now in the engine's prefix cache (not a sample)
                with self.perf.prefill(h + n) as run:
                    cached, _ = await self._one(h + n, 1, ids=prefix + self._prompt(n))
                    run.uncached_tokens = h + n - cached
            done += 1
            self.progress(f"profile {done}/{total}: prefill of {n} tokens after {h} cached")
        def steps_of(batch: int, n: int) -> int:
            # Enough tokens each that the whole batch decodes DECODE_STEPS steps together once the
            # last of its n-token prompts is in (the engine takes step_tokens of prompts a step).
            return DECODE_STEPS + -(-batch * n // (self.perf.step_tokens or VLLM_STEP_TOKENS))

        for batch, n in DECODE_RUNS:
            batch = min(batch, self.max_seqs)
            # No more streams than the engine's KV cache holds whole (a block of slack each): past
            # that vLLM preempts, and the recomputed prompts would be timed as decode steps.
            room = self.perf.kv_room()
            if room is not None and room[0] > 0:
                batch = max(1, min(batch, room[0] // (min(n, self.max_len) + steps_of(batch, n) + KV_SLACK_TOKENS)))
            steps = steps_of(batch, n)
            n = min(n, self.max_len - steps - 1)
            if n < 1:  # a context too short for this run's prompts and steps
                done += 1
                self.progress(f"profile {done}/{total}: decode batch of {batch} skipped (no room in a context of "
                              f"{self.max_len} tokens)")
                continue
            await asyncio.gather(*(self._stream(n, steps) for _ in range(batch)))
            done += 1
            self.progress(f"profile {done}/{total}: decode batch of {batch} at {n} prompt tokens")


async def seed_from_profile(perf: NodePerf, engine: Any, *, mode: str, cache_dir: Path, model_dir: str,
                            settings: dict[str, object], cores: int, vocab_size: int, max_model_len: int,
                            max_num_seqs: int) -> str:
    """Give ``perf`` its starting model (cached, or profiled now); say what was done."""
    if mode not in MODES:
        raise ValueError(f"--profile must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return "profile off: the model starts empty and is fitted from the requests served"
    key = profile_key(model_dir, settings, cores)
    path = cache_file(cache_dir, key)
    if mode == "auto" and (cached := load_cached(path, key)) is not None:
        perf.seed(cached)
        return f"performance model from the cached profile {path}"
    t0 = time.monotonic()
    logger.info("profiling this node's engine (once per model, hardware and settings; cached in %s)", path)
    # A new seed each run: a node's KV store (its disk tier outlives restarts) must never have seen
    # these prompts, or their prefills would be loads.
    await Profiler(engine, perf, vocab_size, max_model_len, max_num_seqs,
                   seed=int.from_bytes(os.urandom(4), "little")).run()
    perf.forget_busy()  # the profile's prefills are not the node's load
    took = time.monotonic() - t0
    try:
        save(path, key, perf.model, took)
    except OSError as exc:
        logger.warning("could not cache the profile in %s: %s (the next start profiles again)", path, exc)
    perf.hold_profile()
    return f"profiled in {took:.1f} s ({perf.model.prefill.samples} prefill, {perf.model.decode.samples} " \
           f"decode samples); cached in {path}"
