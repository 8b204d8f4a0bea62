import pytest

from tandem.errors import InvalidRequest
from tandem.proto import tandem_pb2 as pb
from tandem.sampling import Sampling, from_proto, to_proto


@pytest.mark.parametrize("kw,prompt_len,words", [
    ({"max_tokens": 0}, 5, "max_tokens must be at least 1"),
    ({"max_tokens": -2}, 5, "max_tokens must be at least 1"),
    ({"max_tokens": 100}, 30, "past the model's context of 128"),
    ({"temperature": -0.1}, 5, "temperature"),
    ({"temperature": float("nan")}, 5, "temperature"),
    ({"top_p": 0.0}, 5, "top_p"),
    ({"top_p": 1.01}, 5, "top_p"),
    ({"top_k": -1}, 5, "top_k"),
    ({"min_tokens": 20, "max_tokens": 10}, 5, "min_tokens"),
    ({"stop": ("",)}, 5, "stop"),
])
def test_validation_names_the_problem(kw: dict, prompt_len: int, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        Sampling(**kw).validate(prompt_len, 128)


def test_valid_sampling_passes_and_remaining_counts_down() -> None:
    s = Sampling(max_tokens=10, min_tokens=3, temperature=0.0, top_p=1.0)
    s.validate(100, 128)
    r = s.remaining(4)
    assert (r.max_tokens, r.min_tokens) == (6, 0)


def test_proto_round_trip_keeps_unset_fields_at_defaults() -> None:
    s = Sampling(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=("x",), ignore_eos=True)
    assert from_proto(to_proto(s, pb.SamplingParams)) == s
    assert from_proto(pb.SamplingParams()) == Sampling()
    assert from_proto(None).max_tokens == 16
