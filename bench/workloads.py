"""Seeded synthetic workloads, saved and replayed as JSONL traces.

chat       input lognormal around 300 tokens (tail to 2K), output around 250
summarize  input 2K-8K, output 50-200 (scaled down to fit the model's context)
code       input around 800, output around 30
prefix-heavy  many requests sharing a few long prefixes (``prefixes`` of them, 4 by default)
multi-turn  conversations: each turn resends the conversation so far (earlier turns and a
           stand-in for each reply) and adds about 64 tokens; ``prefixes`` conversations at once
           (16 by default), one restarting when it would outgrow the context; with a corpus
           seed (`bench compare --warm-prefixes`), the conversations are already under way
           (``under_way``) and the same for every probe: steady state, not each probe's first turns
burst      chat lengths with bursty (gamma, shape 0.2) arrivals
Arrivals are open-loop: Poisson (exponential gaps), or gamma with a burstiness
factor (shape; 1 is Poisson, smaller is burstier), as in vLLM's benchmark.
Mooncake-style traces (timestamp ms, input_length, output_length, hash_ids) load too.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

WORKLOADS = ("chat", "summarize", "code", "prefix-heavy", "multi-turn", "burst")
FIRST_TOKEN_ID = 5  # ids below are the tiny model's special tokens
SET_SIZES = {"prefix-heavy": 4, "multi-turn": 16}  # prefixes / conversations at once, unless given


@dataclass
class TraceEntry:
    arrival_s: float
    input_len: int
    output_len: int
    prefix_id: int | None = None
    input_ids: list[int] | None = None
    hash_ids: list[int] | None = None
    ttft_scale: float | None = None  # its TTFT objective is the run's times this (SLO tiers)


def arrivals(rng: random.Random, rate: float, duration_s: float, burstiness: float = 1.0) -> list[float]:
    """Open-loop arrival times in [0, duration_s): gamma gaps with mean 1/rate and shape ``burstiness``."""
    if rate <= 0 or duration_s <= 0 or burstiness <= 0:
        raise ValueError("rate, duration and burstiness must be positive")
    t, out = 0.0, []
    while True:
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        if t >= duration_s:
            return out
        out.append(t)


def _clip(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(x))))


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """``n`` token ids drawn from ``rng`` (none of the special tokens)."""
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]


def _lengths(name: str, rng: random.Random, ctx: int) -> tuple[int, int]:
    if name in ("chat", "burst", "prefix-heavy"):
        out = _clip(rng.gauss(250, 50), 16, 512)
        inp = _clip(rng.lognormvariate(5.7, 0.6), 16, 2048)  # median e^5.7 = 299
    elif name == "summarize":
        out = rng.randint(50, 200)
        inp = rng.randint(2000, 8000)
    elif name == "code":
        out = _clip(rng.gauss(30, 8), 4, 64)
        inp = _clip(rng.gauss(800, 150), 64, 2048)
    else:
        raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
    # Scale down to the model's context, keeping the output.
    out = min(out, max(1, ctx // 4))
    inp = min(inp, ctx - out - 1)
    return max(1, inp), out


def generate(name: str, *, rate: float, duration_s: float, seed: int = 0, max_model_len: int = 8192,
             vocab_size: int = 600, burstiness: float | None = None, with_ids: bool = True,
             prefixes_n: int | None = None, corpus_seed: int | None = None) -> list[TraceEntry]:
    """A seeded trace: the same arguments give the same trace. ``prefixes_n``: prefix-heavy's shared
    prefixes, multi-turn's conversations at once (the working set). ``corpus_seed``: prefix-heavy's
    prefixes, or multi-turn's conversations under way, from this seed instead of ``seed`` (one
    corpus under traces that differ)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
    rng = random.Random(f"{name}:{seed}")
    shape = burstiness if burstiness is not None else (0.2 if name == "burst" else 1.0)
    times = arrivals(rng, rate, duration_s, shape)
    n = prefixes_n or SET_SIZES.get(name, 0)
    if name == "multi-turn":
        start = None if corpus_seed is None else under_way(n, max_model_len, vocab_size, corpus_rng(name, corpus_seed))
        return _multi_turn(rng, times, max_model_len, vocab_size, n, start)
    prefixes: list[list[int]] = []
    if name == "prefix-heavy":
        prefixes = corpus(n, max_model_len, vocab_size, rng if corpus_seed is None else corpus_rng(name, corpus_seed))
    out = []
    for t in times:
        if name == "prefix-heavy":
            pid = rng.randrange(len(prefixes))
            suffix_len = _clip(rng.gauss(64, 16), 8, 128)
            olen = min(_clip(rng.gauss(128, 32), 16, 256), max_model_len - len(prefixes[pid]) - suffix_len - 1)
            ids = prefixes[pid] + _ids(rng, suffix_len, vocab_size)
            out.append(TraceEntry(t, len(ids), max(1, olen), pid, ids if with_ids else None))
            continue
        ilen, olen = _lengths(name, rng, max_model_len)
        ids = _ids(rng, ilen, vocab_size) if with_ids else None
        out.append(TraceEntry(t, ilen, olen, None, ids))
    return out


def corpus(n: int, max_model_len: int, vocab_size: int, rng: random.Random) -> list[list[int]]:
    """prefix-heavy's shared prefixes: ``n`` of min(1024, context / 2) tokens."""
    plen = min(1024, max_model_len // 2)
    return [_ids(rng, plen, vocab_size) for _ in range(n)]


def corpus_rng(workload: str, seed: int) -> random.Random:
    """The generator of a workload's corpus (prefix-heavy's prefixes, multi-turn's conversations
    under way): the trace and the warm-up draw the same one."""
    return random.Random(f"{'conversations' if workload == 'multi-turn' else 'corpus'}:{seed}")


def _system(rng: random.Random, max_model_len: int, vocab_size: int) -> list[int]:
    """multi-turn's system prompt: every conversation starts with the same instructions."""
    return _ids(rng, min(256, max_model_len // 8), vocab_size)


def _turn(rng: random.Random) -> tuple[int, int]:
    """A turn's new user message and its reply, in tokens."""
    return _clip(rng.gauss(64, 16), 16, 128), _clip(rng.gauss(64, 16), 16, 128)


def under_way(n: int, max_model_len: int, vocab_size: int,
              rng: random.Random) -> tuple[list[int], list[list[int]]]:
    """multi-turn's ``n`` conversations already under way: one system prompt, and each conversation
    that prompt and the earlier turns (messages and replies) of a length drawn evenly between the
    prompt alone and three quarters of the context: what a service holds in steady state."""
    system = _system(rng, max_model_len, vocab_size)
    out = []
    for _ in range(n):
        target, h = rng.uniform(len(system), 0.75 * max_model_len), list(system)
        while True:
            user, reply = _turn(rng)
            if len(h) + user + reply > target:
                break
            h += _ids(rng, user, vocab_size) + _ids(rng, reply, vocab_size)
        out.append(h)
    return system, out


def _multi_turn(rng: random.Random, times: list[float], max_model_len: int, vocab_size: int,
                conversations: int, start: tuple[list[int], list[list[int]]] | None = None) -> list[TraceEntry]:
    if start is None:
        system = _system(rng, max_model_len, vocab_size)
        history: list[list[int]] = [list(system) for _ in range(conversations)]
    else:
        system, history = start[0], [list(h) for h in start[1]]
    out = []
    for t in times:
        c = rng.randrange(len(history))
        user, reply = _turn(rng)
        if len(history[c]) + user + reply + 1 > max_model_len:
            history[c] = list(system)  # a new conversation in its place
        ids = history[c] + _ids(rng, user, vocab_size)
        out.append(TraceEntry(t, len(ids), reply, c, ids))
        history[c] = ids + _ids(rng, reply, vocab_size)  # the next turn resends this one and a stand-in for its reply
    return out


def warm_entries(workload: str, n: int | None, max_model_len: int, vocab_size: int, corpus_seed: int) -> list[TraceEntry]:
    """What ``--warm-prefixes`` sends before the sweep, one at a time: each of prefix-heavy's
    prefixes, or each of multi-turn's conversations under way (``n`` of them; None: the workload's
    own number, as ``generate`` takes it), with a few tokens of its own after
    it and a 2-token reply (arrival times are the caller's)."""
    size, rng = n or SET_SIZES.get(workload, 0), corpus_rng(workload, corpus_seed)
    if workload == "multi-turn":
        seen = under_way(size, max_model_len, vocab_size, rng)[1]
    elif workload == "prefix-heavy":
        seen = corpus(size, max_model_len, vocab_size, rng)
    else:
        raise ValueError(f"{workload!r} has no corpus to warm (prefix-heavy and multi-turn do)")
    return [TraceEntry(0.0, len(p) + 8, 2, i, p + [FIRST_TOKEN_ID + i % 7] * 8) for i, p in enumerate(seen)]


def save_trace(path: str | Path, entries: list[TraceEntry]) -> None:
    with open(path, "w") as f:
        for e in entries:
            f.write(json.dumps({k: v for k, v in asdict(e).items() if v is not None}) + "\n")


def load_trace(path: str | Path) -> list[TraceEntry]:
    """A trace saved by save_trace, or a Mooncake-style one (timestamp in ms, hash_ids)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            try:
                if "timestamp" in d:  # Mooncake
                    out.append(TraceEntry(float(d["timestamp"]) / 1000.0, int(d["input_length"]),
                                          int(d["output_length"]), hash_ids=list(d.get("hash_ids") or [])))
                else:
                    out.append(TraceEntry(**d))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: not a trace line: {exc}") from exc
    out.sort(key=lambda e: e.arrival_s)
    return out


def assign_tiers(entries: list[TraceEntry], scales: list[float], seed: int) -> None:
    """Give each entry one of ``scales`` (its TTFT objective = the run's x scale), seeded, in
    equal shares on average: requests of several SLO tiers in one stream."""
    rng = random.Random(f"tiers:{seed}")
    for e in entries:
        e.ttft_scale = rng.choice(scales)


def materialize(entries: list[TraceEntry], seed: int, vocab_size: int, block_tokens: int = 512) -> None:
    """Give entries without token ids some: Mooncake hash_ids become shared blocks of ids."""
    blocks: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if e.input_ids is not None:
            continue
        rng = random.Random(f"materialize:{seed}:{i}")
        ids: list[int] = []
        for h in e.hash_ids or []:
            if h not in blocks:
                brng = random.Random(f"block:{seed}:{h}")
                blocks[h] = _ids(brng, block_tokens, vocab_size)
            ids.extend(blocks[h])
        ids = ids[: e.input_len]
        ids += _ids(rng, e.input_len - len(ids), vocab_size)
        e.input_ids = ids
