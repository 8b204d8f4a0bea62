"""`tandem chaos`'s load: the seeded requests each scenario sends, one request's streaming call
with what became of it (``Outcome``), and a scenario's accounting (``ScenarioResult``). The
faults and the harness that runs them: chaos.py."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

CLIENT_DEADLINE_S = 120.0


@dataclass
class Outcome:
    index: int
    prompt: list[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    status: str = ""  # "ok", a gRPC status name, "hung" or "lost"
    details: str = ""
    migrations: int = 0
    sent_at: float = 0.0  # seconds from the scenario's start, like done_at
    done_at: float = 0.0
    front: str = ""  # the coordinator it went through


@dataclass
class ScenarioResult:
    scenario: str
    victim: str
    requests: int
    completed: int
    ended_with_status: int
    statuses: dict[str, int]
    migrated: int
    hung: int
    lost: int
    token_mismatches: int
    kv_blocks_held_after: float
    recovery_s: float | None
    supervisor_events: list[str]
    by_front: dict[str, dict[str, int]] = field(default_factory=dict)  # coordinator -> status -> count
    # switch-roles: the roles the victim took in turn, requests it served in each (by the coordinator's
    # count) and requests in flight when a switch was asked (each replayed undisturbed: token_mismatches)
    switches: list[dict[str, object]] = field(default_factory=list)
    in_flight_at_switch: int = 0


def workload(n: int, rate: float, seed: int, vocab: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt ids, max_tokens) for n requests; Poisson arrivals at ``rate``."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(5, vocab) for _ in range(rng.randrange(16, 160))]
        out.append((t, prompt, rng.randrange(24, 128)))
    return out


async def send_one(stub: object, o: Outcome, t0: float) -> None:
    from tandem.proto import tandem_pb2 as pb

    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=o.prompt), sampling=pb.SamplingParams(
        max_tokens=o.max_tokens, temperature=0.0, ignore_eos=True))
    sent = time.monotonic()
    o.sent_at = sent - t0
    finished = False
    try:
        async for msg in stub.Generate(req, timeout=CLIENT_DEADLINE_S):  # type: ignore[attr-defined]
            o.tokens.extend(msg.token_ids)
            if msg.HasField("finish"):
                finished = True
                o.migrations = msg.finish.migrations
        o.status = "ok" if finished else "lost"
    except grpc.aio.AioRpcError as exc:
        hung = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - sent >= CLIENT_DEADLINE_S - 1
        o.status, o.details = ("hung" if hung else exc.code().name), (exc.details() or "")[:200]
    except Exception as exc:  # anything else is a request we cannot account for
        o.status, o.details = "lost", f"{type(exc).__name__}: {exc}"[:200]
    o.done_at = time.monotonic() - t0
