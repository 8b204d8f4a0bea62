"""Sampling parameters: the project's own type, validated once, free of engine imports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .errors import InvalidRequest

MAX_STOP_STRINGS = 16
INT32_MAX = 2**31 - 1  # the wire's top_k (SamplingParams is int32 there)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0

    def remaining(self, produced: int) -> Sampling:
        """The same sampling for what is left after ``produced`` tokens."""
        return replace(self, max_tokens=self.max_tokens - produced,
                       min_tokens=max(0, self.min_tokens - produced))

    def validate(self, prompt_len: int, max_model_len: int) -> None:
        """Raise InvalidRequest naming the first problem; costs no engine work."""
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) plus max_tokens ({self.max_tokens}) is "
                f"{prompt_len + self.max_tokens}, past the model's context of {max_model_len} tokens")
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= INT32_MAX:
            raise InvalidRequest(f"top_k must be in [0, {INT32_MAX}] (0 turns it off), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidRequest(f"seed must fit in 64 bits, got {self.seed}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")


def from_proto(msg: object, default_max_tokens: int = 16) -> Sampling:
    """From a tandem.v1.SamplingParams message (absent fields take defaults)."""
    def opt(name: str, default: object) -> object:
        return getattr(msg, name) if msg is not None and msg.HasField(name) else default  # type: ignore[attr-defined]

    return Sampling(
        max_tokens=int(opt("max_tokens", default_max_tokens)),  # type: ignore[arg-type]
        temperature=float(opt("temperature", 1.0)),  # type: ignore[arg-type]
        top_p=float(opt("top_p", 1.0)),  # type: ignore[arg-type]
        top_k=int(opt("top_k", 0)),  # type: ignore[arg-type]
        seed=opt("seed", None),  # type: ignore[arg-type]
        stop=tuple(getattr(msg, "stop", ()) or ()),
        ignore_eos=bool(getattr(msg, "ignore_eos", False)),
        min_tokens=int(opt("min_tokens", 0)),  # type: ignore[arg-type]
    )


def to_proto(s: Sampling, pb: object) -> object:
    """Fill a tandem.v1.SamplingParams message class ``pb``."""
    msg = pb(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,  # type: ignore[operator]
             top_k=s.top_k, stop=list(s.stop), ignore_eos=s.ignore_eos, min_tokens=s.min_tokens)
    if s.seed is not None:
        msg.seed = s.seed
    return msg
