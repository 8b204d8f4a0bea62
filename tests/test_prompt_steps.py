"""Prompts in steps of their own (kvtransfer/scheduler_side.py: PromptSteps), driven as vLLM's
scheduler drives the connector's scheduler half each step: running requests first (the connector
is not asked), then each waiting one (get_num_new_matched_tokens; update_state_after_alloc when
it is started), then build_connector_meta; then the step's tokens are counted as computed."""

from __future__ import annotations

from types import SimpleNamespace

from vllm.v1.request import RequestStatus

from tandem.kvtransfer.handle import CONSUME, TransferHandle
from tandem.kvtransfer.scheduler_side import SchedulerSide

BUDGET = 256  # tokens a step (a decode node's)


def prompt(rid: str, tokens: int, params: dict | None = None) -> SimpleNamespace:
    r = SimpleNamespace(request_id=rid, num_prompt_tokens=tokens, num_tokens=tokens, num_computed_tokens=0,
                        status=RequestStatus.WAITING, kv_transfer_params=params, skip_reading_prefix_cache=False)
    r.is_finished = lambda: RequestStatus.is_finished(r.status)
    return r


def step(side: SchedulerSide, running: list, waiting: list) -> dict[str, int]:
    """One scheduler step, as vLLM's: the tokens each request got in it."""
    budget, got = BUDGET, {}
    for r in running:  # a prompt's next chunk, or a decode's one token
        n = min(r.num_prompt_tokens - r.num_computed_tokens, budget) if r.num_computed_tokens < r.num_prompt_tokens else 1
        got[r.request_id], budget = n, budget - n
    for r in list(waiting):
        if budget <= 0:
            break
        ext, _ = side.get_num_new_matched_tokens(r, 0)
        if ext is None:
            continue  # held: it keeps its place in the queue
        n = min(r.num_prompt_tokens - ext, budget)
        side.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: [[0, 1, 2, 3]]), ext)
        waiting.remove(r)
        running.append(r)
        r.status, r.num_computed_tokens = RequestStatus.RUNNING, ext
        got[r.request_id], budget = n, budget - n
    side.build_connector_meta()
    for r in running:
        r.num_computed_tokens += got.get(r.request_id, 0)
    return got


def side(own: bool) -> SchedulerSide:
    return SchedulerSide("e", 16, "", 30.0, own_steps=own)


def test_a_prompt_sent_behind_another_starts_in_the_step_after_the_others_last_chunk() -> None:
    s = side(own=True)
    decode = prompt("d", 10)
    decode.status, decode.num_computed_tokens = RequestStatus.RUNNING, 10  # a stream decoding
    a, b = prompt("a", 300), prompt("b", 97)
    running, waiting = [decode], [a, b]
    assert step(s, running, waiting) == {"d": 1, "a": 255}  # b is not started beside a's first chunk
    assert step(s, running, waiting) == {"d": 1, "a": 45}  # nor beside its last: a's first token is its own
    assert step(s, running, waiting) == {"d": 1, "a": 1, "b": 97}  # and then at once: the engine never idles
    assert s.steps is not None and s.steps.held == 1 and not waiting  # (the first step had no budget left to ask)


def test_vllms_own_scheduling_fills_the_last_chunks_step_with_the_next_prompt() -> None:
    s = side(own=False)
    a, b = prompt("a", 300), prompt("b", 97)
    running, waiting = [], [a, b]
    assert step(s, running, waiting) == {"a": 256}
    assert step(s, running, waiting) == {"a": 44, "b": 97}


def test_two_prompts_arriving_together_start_one_a_step_and_a_finished_prompt_holds_nothing() -> None:
    s = side(own=True)
    a, b, c = prompt("a", 40), prompt("b", 40), prompt("c", 40)
    running, waiting = [], [a, b, c]
    assert step(s, running, waiting) == {"a": 40}
    a.status = RequestStatus.FINISHED_ABORTED  # (aborted before its first token came back)
    s.request_finished(a, [])
    running.remove(a)
    assert step(s, running, waiting) == {"b": 40}
    assert step(s, running, waiting) == {"b": 1, "c": 40}


def test_a_request_whose_prompt_arrives_as_kv_is_neither_held_nor_holds_others() -> None:
    s = side(own=True)
    a = prompt("a", 300)
    handle = TransferHandle("p", "127.0.0.1:1", "r", [0, 1, 2, 3], 64, 1e12).to_params(CONSUME)
    kv, b = prompt("kv", 64, handle), prompt("b", 20)
    running, waiting = [], [a]
    step(s, running, waiting)
    waiting += [kv, b]
    got = step(s, running, waiting)  # beside a's last chunk: kv starts (its load), b waits
    assert got == {"a": 44, "kv": 0} and waiting == [b]
    assert s.steps is not None and s.steps.held == 1
    assert step(s, running, waiting) == {"a": 1, "kv": 1, "b": 20}  # kv computed nothing: it holds no one
