import pytest

from tandem.coordinator.http_api import COMPLETION_FIELDS, _check_fields, sampling_from_body
from tandem.errors import InvalidRequest


def test_unknown_fields_and_unsupported_values_are_named() -> None:
    _check_fields({"prompt": "x", "n": 1, "logprobs": None, "repetition_penalty": 1.0}, COMPLETION_FIELDS)
    with pytest.raises(InvalidRequest, match="unknown field 'bogus'"):
        _check_fields({"prompt": "x", "bogus": 1}, COMPLETION_FIELDS)
    with pytest.raises(InvalidRequest, match="'n' is not supported"):
        _check_fields({"prompt": "x", "n": 2}, COMPLETION_FIELDS)


def test_sampling_from_body_types() -> None:
    s = sampling_from_body({"max_tokens": 5, "temperature": 0, "stop": "x", "seed": 3, "ignore_eos": True})
    assert (s.max_tokens, s.temperature, s.stop, s.seed, s.ignore_eos) == (5, 0.0, ("x",), 3, True)
    assert sampling_from_body({}).max_tokens == 16
    for bad, words in [({"max_tokens": "5"}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
                       ({"stop": [1]}, "stop"), ({"seed": 1.5}, "seed"), ({"max_tokens": True}, "max_tokens")]:
        with pytest.raises(InvalidRequest, match=words):
            sampling_from_body(bad)
