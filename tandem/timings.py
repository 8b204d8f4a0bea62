"""A node's times, in seconds, as the simulator, the simulated nodes and the planner take them: from
a node's cached profile (tandem/profile.py's file), a plain file of coefficients (a published
table), or a node's fitted model (tandem/perfmodel.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem.perfmodel import LOAD_MIN_SAMPLES, NodeModel, decode_step_s, load_fit


@dataclass(frozen=True)
class Timings:
    """A node's times in seconds: prefill ``a + b·n + c·n·(n + 2h)`` of n uncached tokens after h
    cached (tandem/perfmodel.py); decode step
    ``d + e·B + f·L + j·(B − DECODE_KNEE)⁺`` for B requests holding L context tokens (given as
    three, a line: j = 0); KV transfer ``g + h·bytes``."""

    prefill: tuple[float, float, float]
    decode: tuple[float, ...]
    transfer: tuple[float, float] = (0.0, 0.0)
    source: str = ""
    # What loading t prompt tokens from the KV store, u of them from disk, adds to a prefill,
    # k + r·t + s·u (a node's learned load fit); (0, 0, 0): the per-token constants.
    store_load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.decode) == 3:  # a line (a published table's, a plain file's): no hinge
            object.__setattr__(self, "decode", (*self.decode, 0.0))
        for name, want in (("prefill", 3), ("decode", 4), ("transfer", 2), ("store_load", 3)):
            v = getattr(self, name)
            if len(v) != want or not all(isinstance(c, (int, float)) and math.isfinite(c) and c >= 0 for c in v):
                need = "3 or 4" if name == "decode" else want
                raise ValueError(f"{self.source or 'a profile'}: {name} needs {need} finite coefficients >= 0, got {list(v)}")
        if not any(self.prefill) or not any(self.decode):
            raise ValueError(f"{self.source or 'a profile'} has no prefill or no decode timings")

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        a, b, c = self.prefill
        return a + b * tokens + c * tokens * (tokens + 2 * cached)

    def step_s(self, batch: int, context_tokens: int) -> float:
        return decode_step_s(self.decode, batch, context_tokens)  # type: ignore[arg-type]

    def transfer_s(self, nbytes: int) -> float:
        g, h = self.transfer
        return g + h * nbytes

    def learned_load(self) -> Callable[[int, int], float] | None:
        """The load fit's prediction for t tokens, u from disk (None: none learned, the constants apply)."""
        if not any(self.store_load):
            return None
        k, r, s = self.store_load
        return lambda t, u: k + r * t + s * u

    @classmethod
    def of_model(cls, model: NodeModel, source: str = "") -> Timings:
        def coef(fit: Any, n: int, min_samples: int = 1) -> tuple[float, ...]:
            c = tuple(fit.coefficients()) if fit.samples >= min_samples else ()
            return c if len(c) == n else (0.0,) * n

        return cls(coef(model.prefill, 3), coef(model.decode, 4), coef(model.transfer, 2), source,  # type: ignore[arg-type]
                   coef(model.load, 3, LOAD_MIN_SAMPLES))  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Timings:
        """A node's cached profile (tandem/profile.py's file) or a plain file of coefficients:
        ``{"prefill": [a, b, c], "decode": [d, e, f], "transfer": [g, h]}`` (e.g. from a
        published table; the decode step's hinge coefficient a fourth, when there is one)."""
        try:
            doc = json.loads(Path(path).read_text())
            if isinstance(doc, dict) and "model" in doc:
                return cls.of_model(NodeModel.from_state(doc["model"]), str(path))
            return cls(tuple(map(float, doc["prefill"])), tuple(map(float, doc["decode"])),  # type: ignore[arg-type]
                       tuple(map(float, doc.get("transfer", (0.0, 0.0)))), str(path),  # type: ignore[arg-type]
                       tuple(map(float, doc.get("load", (0.0, 0.0, 0.0)))))  # type: ignore[arg-type]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, ValueError) and str(path) in str(exc):
                raise
            raise ValueError(f"{path}: not a profile (need a node's cached profile, or prefill [a, b, c] and "
                             f"decode [d, e, f]): {exc!r}") from None

    def to_model(self) -> NodeModel:
        """A node model that predicts these times (fitted to exact samples of them): what a
        simulated node reports to the coordinator."""
        m = NodeModel()
        for n in (16, 64, 256, 512, 1024, 2048, 4096, 8192):
            m.saw_prefill(n, self.prefill_s(n))
        for b, ctx in ((1, 64), (1, 2048), (4, 512), (8, 8192), (32, 4096), (64, 32768), (16, 1024), (2, 256)):
            m.saw_decode_step(b, ctx, self.step_s(b, ctx))
        if any(self.transfer):
            for x in (10**4, 10**6, 10**8, 10**9):
                m.saw_transfer(x, self.transfer_s(x))
        if (learned := self.learned_load()) is not None:
            m.load = load_fit(prior=False)  # exactly these times
            for t, u in ((256, 0), (1024, 0), (4096, 0), (256, 256), (1024, 512), (4096, 4096)):
                m.saw_load(t, u, learned(t, u))
        return m

    @classmethod
    def from_fits(cls, fits: Iterable[Any], source: str) -> Timings:
        """A node's fits as it has learned them while serving (``PerfFit`` messages: ``NodeLoad.fits``,
        ``NodeInfo.fits``) as times: a negative coefficient, a fit's noise, counts as 0; a fit with no
        samples, or a load fit with fewer than admission uses, is left at 0. ValueError when the
        prefill or the decode fit is missing (a node that has sent no load message yet)."""
        got = {f.name: tuple(max(0.0, c) for c in f.coefficients) for f in fits
               if f.samples >= (LOAD_MIN_SAMPLES if f.name == "load" else 1)}
        return cls(got.get("prefill", (0.0, 0.0, 0.0)), got.get("decode", (0.0, 0.0, 0.0)),  # type: ignore[arg-type]
                   got.get("transfer", (0.0, 0.0)), source, got.get("load", (0.0, 0.0, 0.0)))  # type: ignore[arg-type]

    @classmethod
    def mean(cls, nodes: list[Timings], source: str = "") -> Timings:
        """Several nodes' times as one (each coefficient their mean: the mean of their predictions,
        the forms being linear in them): the simulator has one set of times for a pool."""
        if not nodes:
            raise ValueError("no timings to average")

        def avg(name: str) -> tuple[float, ...]:  # over the nodes that have the fit (a transfer, a load)
            have = [getattr(t, name) for t in nodes if any(getattr(t, name))] or [getattr(nodes[0], name)]
            return tuple(sum(c) / len(have) for c in zip(*have))

        named = source or " + ".join(t.source for t in nodes)
        return cls(avg("prefill"), avg("decode"), avg("transfer"), named, avg("store_load"))  # type: ignore[arg-type]

    def doc(self) -> dict[str, Any]:
        return asdict(self)
