"""The OpenAI request bodies: pydantic models, strict, with errors that name the field."""

import pytest

from tandem.coordinator.openai_protocol import ChatRequest, CompletionRequest, DetokenizeRequest, parse
from tandem.errors import InvalidRequest


def test_unknown_fields_and_unsupported_values_are_named() -> None:
    parse(CompletionRequest, {"prompt": "x", "n": 1, "logprobs": None, "repetition_penalty": 1.0})
    for body, words in [({"bogus": 1}, "unknown field 'bogus'"), ({"n": 2}, "'n' is not supported"),
                        ({"stream": True, "stream_options": {"x": 1}}, "unknown field 'stream_options.x'"),
                        ({"stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
                        ({"n": True}, "'n' is not supported"), ({"echo": 0}, "'echo' is not supported")]:
        with pytest.raises(InvalidRequest, match=words.replace("(", r"\(")):
            parse(CompletionRequest, {"prompt": "x", **body})
    with pytest.raises(InvalidRequest, match="'tools' is not supported"):
        parse(ChatRequest, {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    with pytest.raises(InvalidRequest, match="unknown field 'messages.0.tool_calls'"):
        parse(ChatRequest, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]})


def test_sampling_types_are_never_coerced() -> None:
    s = parse(CompletionRequest, {"prompt": "x", "max_tokens": 5, "temperature": 0, "stop": "x", "seed": 3,
                                  "ignore_eos": True}).sampling(16)
    assert (s.max_tokens, s.temperature, s.stop, s.seed, s.ignore_eos) == (5, 0.0, ("x",), 3, True)
    assert parse(CompletionRequest, {"prompt": "x"}).sampling(16).max_tokens == 16
    for bad, words in [({"max_tokens": "5"}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
                       ({"stop": [1]}, "'stop' must be a string or a list of strings"), ({"seed": 1.5}, "seed"),
                       ({"max_tokens": True}, "max_tokens"), ({"prompt": [1, "a"]}, "'prompt' must be")]:
        with pytest.raises(InvalidRequest, match=words):
            parse(CompletionRequest, {"prompt": "x", **bad})
    with pytest.raises(InvalidRequest, match="'tokens.1'"):
        parse(DetokenizeRequest, {"tokens": [1, "a"]})
    with pytest.raises(InvalidRequest, match="must be an object"):
        parse(CompletionRequest, ["x"])


def test_chat_takes_max_completion_tokens_and_text_parts() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 4, "max_completion_tokens": 7}
    req = parse(ChatRequest, body)
    assert req.plain_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert req.sampling(100).max_tokens == 7  # max_completion_tokens supersedes max_tokens, as in vLLM
    assert parse(ChatRequest, {"messages": body["messages"]}).sampling(100).max_tokens == 100
    with pytest.raises(InvalidRequest, match="type 'image_url': this server takes text parts only"):
        parse(ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(InvalidRequest, match="'messages.0.content' must be a string or a list of text parts"):
        parse(ChatRequest, {"messages": [{"role": "user", "content": 5}]})
    with pytest.raises(InvalidRequest, match="'messages'"):
        parse(ChatRequest, {"messages": []})


def test_a_batch_of_prompts_is_refused_by_name() -> None:
    assert parse(CompletionRequest, {"prompt": ["one"]}).text_or_ids() == ("one", None)
    assert parse(CompletionRequest, {"prompt": [3, 4]}).text_or_ids() == (None, [3, 4])
    for prompt, words in [(["a", "b"], "batches are not supported"), ([], "empty prompt"), ("", "empty prompt")]:
        with pytest.raises(InvalidRequest, match=words):
            parse(CompletionRequest, {"prompt": prompt}).text_or_ids()


def test_usage_on_every_chunk_only_with_include_usage_as_vllm() -> None:
    def opts(o: dict) -> tuple[bool, bool]:
        return parse(CompletionRequest, {"prompt": "x", "stream": True, "stream_options": o}).usage_options()

    assert opts({"include_usage": True, "continuous_usage_stats": True}) == (True, True)
    assert opts({"continuous_usage_stats": True}) == (False, False)
    assert opts({"include_usage": True}) == (True, False)


def test_out_of_range_sampling_is_a_clear_error_not_a_crash_on_the_wire() -> None:
    from tandem.sampling import Sampling

    for s, words in [(Sampling(top_k=2**40), "top_k"), (Sampling(seed=2**70), "seed"),
                     (Sampling(temperature=float("inf")), "temperature")]:
        with pytest.raises(InvalidRequest, match=words):
            s.validate(1, 100)


def _reference_chunks(events: list, head: dict, chat: bool, include_usage: bool, prompt: int | None) -> bytes:
    """The stream's bytes made the plain way: each chunk's dict through json.dumps."""
    import json

    from tandem.coordinator.request import TokenEvent

    out, done, first = [], 0, True
    for ev in events:
        if isinstance(ev, TokenEvent):
            done += len(ev.token_ids)
        text, finish = (ev.text, None) if isinstance(ev, TokenEvent) else ("", ev.reason)
        if chat:
            choice = {"index": 0, "delta": {"content": text, **({"role": "assistant"} if first else {})},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        usage = {} if prompt is None else {"usage": {"prompt_tokens": prompt, "completion_tokens": done,
                                                     "total_tokens": prompt + done}}
        out.append(f"data: {json.dumps({**head, 'choices': [choice], **usage})}\n\n")
        if not isinstance(ev, TokenEvent) and include_usage:
            total = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                     "total_tokens": ev.prompt_tokens + ev.completion_tokens}
            out.append(f"data: {json.dumps({**head, 'choices': [], 'usage': total})}\n\n")
        first = False
    return "".join(out).encode()


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage", ["none", "end", "every"])
def test_sse_chunks_are_byte_for_byte_what_json_dumps_makes_of_each_chunk(chat: bool, usage: str) -> None:
    import random

    from tandem.coordinator.http_api import _MARK, SseChunks
    from tandem.coordinator.request import FinishEvent, TokenEvent

    rng = random.Random(7)
    alphabet = ['"', "\\", "\n", "\t", "\x00", "\x1f", "\u2028", "é", "漢", "😀", "\ud800", "a", " ", "/", "<"]
    texts = ["", *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(300))]
    events = [TokenEvent([1] * rng.randint(0, 3), t) for t in texts] + [FinishEvent("stop", 4, 17)]
    finish_only = [FinishEvent("length", 4, 0)]  # (no token came: the finish is the first chunk)
    for head in ({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m"},
                 {"id": _MARK, "object": "text_completion", "created": 5, "model": "m"},  # (made whole)
                 {"id": "cmpl-\"é", "object": "chat.completion.chunk", "created": 0, "model": 'a"b'}):
        prompt = 4 if usage == "every" else None
        sse = SseChunks(head, chat, usage != "none", prompt)
        assert b"".join(sse.event(ev) for ev in events) == _reference_chunks(events, head, chat, usage != "none",
                                                                             prompt)
        assert (sse.around is not None) == (head["id"] != _MARK and usage != "every")
        sse = SseChunks(head, chat, usage != "none", prompt)
        assert b"".join(sse.event(ev) for ev in finish_only) == _reference_chunks(finish_only, head, chat,
                                                                                  usage != "none", prompt)
