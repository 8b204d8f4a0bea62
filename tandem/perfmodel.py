"""Per-node performance models, fitted online from the node's own timings.

The forms are DistServe's (and what its simulator fits): a prefill of ``n``
uncached prompt tokens takes ``a + b·n + c·n²`` seconds (the quadratic term is
attention), and after ``h`` tokens found cached ``a + b·n + c·(n² + 2·n·h)``: the
new tokens attend to the cached ones too, ``(n + h)² − h²`` pairs (the twenty-fourth
sitting, a 1:1 multi-turn run at 1–3 req/s: prefill calls of ~160 new tokens took 68
ms after 300–700 cached and 80 ms after more, where the form without ``h`` said 61
for both; refitted on those calls, p50 / p90 error 11.8 / 25.4 % without ``h``, 8.0
/ 19.1 % with it, 7.8 / 18.5 % with a fourth coefficient for ``n·h`` instead:
not worth one); a decode step of ``B`` requests holding ``L`` context tokens in all
takes ``d + e·B + f·L + j·(B − DECODE_KNEE)⁺`` (flat over a few streams, then
rising: ``decode_features``); a KV transfer of ``x`` bytes takes ``g + h·x``; and
``k + r·t + s·u`` is what loading ``t`` prompt tokens from the node's KV store,
``u`` of them from its disk tier, adds to a prefill (learned as the node
serves, from a prior of the per-token constants ``LOAD_S_PER_TOKEN``).

Each model is an ``OnlineFit``: least squares over its samples with
exponential forgetting (the newest ``half_life`` samples count as much as all
older ones together), so the fit follows a node whose speed drifts, with every
coefficient kept non-negative (a time never shrinks with more work) by a
small active-set solve. It keeps only sufficient statistics: memory and
update cost are constant, whatever the number of samples. Pure Python: the
coordinator and node daemons import it without numpy.

``state()`` and ``from_state()`` carry a whole fit (its statistics) across
processes: a node's startup profile is cached that way. What a node reports to
the coordinator is only the fitted coefficients (``ModelView``), enough to
predict with. Who feeds it: tandem/node/perf.py (every request a node serves)
and tandem/profile.py (a short profile at node start); who predicts with it:
coordinator/estimates.py (for admission), tandem/sim.py and tandem/plan.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

VLLM_STEP_TOKENS = 2048  # an engine's tokens a step when its node does not set them (vLLM's default)


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                if f:
                    for c in range(col, n + 1):
                        m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


@dataclass
class OnlineFit:
    """y ≈ Σ coef_i · x_i with coef_i ≥ 0, by forgetting least squares.

    ``names`` label the features (the first is usually the constant 1). ``scale``
    divides each feature before fitting so that the normal equations stay well
    conditioned when features differ by orders of magnitude (tokens, tokens²).
    """

    names: tuple[str, ...]
    scale: tuple[float, ...]
    half_life: float = 200.0
    ridge: float = 1e-9
    _xtx: list[list[float]] = field(default_factory=list, repr=False)
    _xty: list[float] = field(default_factory=list, repr=False)
    weight: float = 0.0  # effective number of samples
    samples: int = 0  # samples ever added
    _coef: list[float] | None = field(default=None, repr=False)
    # A prior that never decays (``hold_as_prior``): the startup profile's grid, which sets features
    # apart that serving moves together (a decode batch and its context grow as one).
    _prior_xtx: list[list[float]] | None = field(default=None, repr=False)
    _prior_xty: list[float] | None = field(default=None, repr=False)
    _prior_weight: float = 0.0

    def __post_init__(self) -> None:
        k = len(self.names)
        if len(self.scale) != k:
            raise ValueError("one scale per feature")
        if not self._xtx:
            self._xtx = [[0.0] * k for _ in range(k)]
            self._xty = [0.0] * k

    @property
    def _decay(self) -> float:
        return 0.5 ** (1.0 / self.half_life)

    def add(self, x: Sequence[float], y: float) -> None:
        if len(x) != len(self.names):
            raise ValueError(f"expected {len(self.names)} features, got {len(x)}")
        if not (math.isfinite(y) and all(math.isfinite(v) for v in x)):
            return  # a broken measurement teaches nothing
        z = [v / s for v, s in zip(x, self.scale)]
        d = self._decay
        k = len(z)
        for i in range(k):
            row = self._xtx[i]
            for j in range(k):
                row[j] = row[j] * d + z[i] * z[j]
            self._xty[i] = self._xty[i] * d + z[i] * y
        self.weight = self.weight * d + 1.0
        self.samples += 1
        self._coef = None

    def hold_as_prior(self, weight: float = 50.0) -> None:
        """What the fit holds now becomes a prior of ``weight`` samples that forgetting never erodes;
        the samples that follow refine it: they decide the directions they span (a light prior
        barely biases those), it keeps the rest."""
        if self.weight <= 0:
            return  # nothing to hold (a second call with no samples since keeps the prior as it is)
        w = min(1.0, weight / self.weight)
        k = len(self.names)
        old_xtx = self._prior_xtx or [[0.0] * k for _ in range(k)]
        old_xty = self._prior_xty or [0.0] * k
        self._prior_xtx = [[o + v * w for o, v in zip(orow, r)] for orow, r in zip(old_xtx, self._xtx)]
        self._prior_xty = [o + v * w for o, v in zip(old_xty, self._xty)]
        self._prior_weight += self.weight * w
        k = len(self.names)
        self._xtx = [[0.0] * k for _ in range(k)]
        self._xty = [0.0] * k
        self.weight = 0.0
        self._coef = None

    def coefficients(self) -> list[float]:
        """The fitted coefficients in the features' own units (all ≥ 0)."""
        if self._coef is None:
            self._coef = [c / s for c, s in zip(self._nnls(), self.scale)]
        return list(self._coef)

    def _nnls(self) -> list[float]:
        """Least squares with coef ≥ 0, approximately: solve on the free set, drop the most
        negative, repeat (features never come back, unlike Lawson-Hanson; with three or four
        features and the forms here that is the same answer in practice: a step that only bends
        up drops the batch's own term, one that never bends drops the hinge)."""
        k = len(self.names)
        xtx, xty, weight = self._xtx, self._xty, self.weight
        if self._prior_xtx is not None and self._prior_xty is not None:
            xtx = [[xtx[i][j] + self._prior_xtx[i][j] for j in range(k)] for i in range(k)]
            xty = [xty[i] + self._prior_xty[i] for i in range(k)]
            weight += self._prior_weight
        free = list(range(k))
        while free:
            a = [[xtx[i][j] + (self.ridge * weight if i == j else 0.0) for j in free] for i in free]
            sol = _solve(a, [xty[i] for i in free])
            if sol is None:
                free.pop()  # singular (too few distinct samples): fewer features
                continue
            if all(c >= 0 for c in sol):
                out = [0.0] * k
                for i, c in zip(free, sol):
                    out[i] = c
                return out
            worst = min(range(len(sol)), key=lambda i: sol[i])
            free.pop(worst)
        return [0.0] * k

    def predict(self, x: Sequence[float]) -> float:
        return sum(c * v for c, v in zip(self.coefficients(), x))

    def state(self) -> dict[str, object]:
        """Its statistics (a prior folded in: restored, it predicts the same until samples come)."""
        k = len(self.names)
        xtx, xty, weight = [r[:] for r in self._xtx], self._xty[:], self.weight
        if self._prior_xtx is not None and self._prior_xty is not None:
            xtx = [[xtx[i][j] + self._prior_xtx[i][j] for j in range(k)] for i in range(k)]
            xty = [xty[i] + self._prior_xty[i] for i in range(k)]
            weight += self._prior_weight
        return {"names": list(self.names), "scale": list(self.scale), "half_life": self.half_life,
                "ridge": self.ridge, "xtx": xtx, "xty": xty, "weight": weight, "samples": self.samples}

    @classmethod
    def from_state(cls, st: dict) -> OnlineFit:
        return cls(tuple(st["names"]), tuple(float(s) for s in st["scale"]), half_life=float(st["half_life"]),
                   ridge=float(st.get("ridge", 1e-9)), _xtx=[[float(v) for v in r] for r in st["xtx"]], _xty=[float(v) for v in st["xty"]],
                   weight=float(st["weight"]), samples=int(st["samples"]))


def prefill_fit(half_life: float = 200.0) -> OnlineFit:
    """seconds ≈ a + b·tokens + c·tokens2 for one prefill of ``tokens`` uncached tokens after
    ``cached`` ones: tokens2 = tokens · (tokens + 2·cached) (tokens² with nothing cached)."""
    return OnlineFit(("const", "tokens", "tokens2"), (1.0, 1e3, 1e6), half_life)


# The batch past which a decode step grows by what each stream adds (``decode_features``).
DECODE_KNEE = 4
DECODE_TERMS = ("const", "batch", "context", "batch_over_knee")


def decode_features(batch: float, context_tokens: float) -> tuple[float, float, float, float]:
    """A decode step's features: 1, the batch, its context tokens, and the batch past
    ``DECODE_KNEE`` (a hinge). A small batch's step is the weights' read and the step's overhead,
    whatever the batch; past a few streams their compute adds to it. Measured on the bench model,
    one core, 300-token contexts (the thirty-seventh sitting): 12.4, 13.8, 11.8, 12.0, 12.7, 13.2 ms
    at batches 1-6, then 16.3, 17.8, 17.9, 26.9, 35.1 ms at 8, 10, 12, 16, 24. A line through the
    profile's batches (1-32) read ~0.85 ms a stream from the start: 16.7 ms at a batch of 5 whose
    requests took 14.6 ms, and admission refused requests for a TPOT objective of 16.3 ms that
    the streams it served at that batch met. With the hinge the fit keeps the line's slope where
    the data has it and may lay it flat below the knee (each coefficient ≥ 0: the step stays
    convex and rising in the batch). On a GPU the flat part reaches further; a knee at 4 is then
    no worse than the line it replaces. The profile's batches (1, 4, 8, 16, 32) pin it. (Admission
    takes the step at a request's mean batch over its life; for a batch that swings across the
    knee the step at the mean is a little under the mean of its steps, which the line never was.)"""
    return (1.0, batch, context_tokens, max(0.0, batch - DECODE_KNEE))


def decode_step_s(coefficients: tuple[float, float, float, float], batch: float, context_tokens: float) -> float:
    """The step ``decode_features`` gives with these four coefficients, unrolled (``ModelView``'s and
    ``Timings``' predictions: admission and the simulator make hundreds a request)."""
    d, e, f, j = coefficients
    return d + e * batch + f * context_tokens + (j * (batch - DECODE_KNEE) if batch > DECODE_KNEE else 0.0)


def decode_fit(half_life: float = 500.0) -> OnlineFit:
    """seconds per step ≈ d + e·batch + f·context (all running requests' tokens) + j·(batch − knee)⁺."""
    return OnlineFit(DECODE_TERMS, (1.0, 10.0, 1e4, 10.0), half_life)


def transfer_fit(half_life: float = 200.0) -> OnlineFit:
    """seconds ≈ g + h·bytes for one request's KV fetch."""
    return OnlineFit(("const", "bytes"), (1.0, 1e8), half_life)


# A prompt token loaded from a KV store instead of computed: its copy into the engine's blocks (and from
# disk, its read, check and promotion first). Measured with `tandem bench kvstore` (2 cores, fp32,
# 16 KiB of KV per token): a RAM hit about 6 ms per 1K tokens over the engine's own cache, a disk
# hit about 37 ms more. The load fit's prior, and what the coordinator predicts with until a node
# has timed ``LOAD_MIN_SAMPLES`` loads of its own (the twenty-fifth sitting's prefills that loaded
# took 1.19-1.38x their computed part's profile, where these said a few per cent).
LOAD_S_PER_TOKEN = {"ram": 6e-6, "disk": 4.2e-5}
LOAD_MIN_SAMPLES = 5


def load_fit(half_life: float = 100.0, prior: bool = True) -> OnlineFit:
    """seconds ≈ k + r·tokens + s·disk_tokens that a prefill spends on ``tokens`` of its prompt
    loaded from the node's KV store, ``disk_tokens`` of them promoted from its disk tier first,
    over what computing the rest after them takes: the copy into the engine's blocks, the read and
    check of a disk chunk, and the step the request sits out meanwhile (k). Its prior, a tenth of a load's
    worth that forgetting never erodes, is ``LOAD_S_PER_TOKEN``: the loads a node times decide the
    directions they span (on a workload whose loads all come from disk, the disk cost) and it
    settles what they leave undetermined. ``samples`` counts the node's own loads only."""
    f = OnlineFit(("const", "tokens", "disk_tokens"), (1.0, 1e3, 1e3), half_life)
    if prior:
        ram, disk = LOAD_S_PER_TOKEN["ram"], LOAD_S_PER_TOKEN["disk"] - LOAD_S_PER_TOKEN["ram"]
        for t, d in ((256, 0), (2048, 0), (256, 256), (2048, 2048), (2048, 256)):
            f.add((1.0, t, d), t * ram + d * disk)
        f.hold_as_prior(weight=0.1)
        f.samples = 0
    return f


def chunk_tokens(step_tokens: int, batch: float) -> int:
    """A prompt's tokens in one engine step beside a decode batch of ``batch``: vLLM's scheduler
    gives each running stream its token first and the prompt the rest of the step's
    ``step_tokens`` (at least one)."""
    return max(1, step_tokens - round(batch))


def chunk_steps(tokens: int, step_tokens: int, batch: float) -> int:
    """The engine steps a prefill of ``tokens`` takes beside a decode batch of ``batch``."""
    return -(-tokens // chunk_tokens(step_tokens, batch))


class Steps(Protocol):
    def step_s(self, batch: float, context_tokens: float) -> float: ...


def beside_s(model: Steps, batch: float, context_tokens: float) -> float:
    """What a decode batch adds to a step that carries a prefill chunk: the batch's step over an
    empty one (the chunk's prefill time, fitted in chunks, already holds a step's overhead)."""
    return max(0.0, model.step_s(batch, context_tokens) - model.step_s(0, 0)) if batch > 0 else 0.0


FITS = ("prefill", "decode", "transfer", "load")  # a node's fits, each an attribute of that name


class _Predicts:
    """The predictions (seconds) from a node's fits (``FITS``, each an attribute by its name),
    whatever holds them: a ``NodeModel``'s own fits, or the coefficients a ``ModelView`` carries."""

    prefill: OnlineFit | FitView
    decode: OnlineFit | FitView
    transfer: OnlineFit | FitView
    load: OnlineFit | FitView

    def named(self) -> list[tuple[str, OnlineFit | FitView]]:
        """(name, fit) of each of ``FITS``: how a node reports and exports them."""
        return [(name, getattr(self, name)) for name in FITS]

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """A prefill of ``tokens`` uncached prompt tokens after ``cached`` ones found cached."""
        return self.prefill.predict((1.0, tokens, tokens * (tokens + 2 * cached)))

    def step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode.predict(decode_features(batch, context_tokens))

    def transfer_s(self, nbytes: int) -> float:
        return self.transfer.predict((1.0, nbytes))

    def store_load_s(self, tokens: int, disk_tokens: int = 0) -> float:
        """What loading ``tokens`` prompt tokens from the KV store, ``disk_tokens`` of them from
        its disk tier, adds to a prefill."""
        return self.load.predict((1.0, tokens, disk_tokens)) if tokens > 0 else 0.0


@dataclass
class NodeModel(_Predicts):
    """What one node's timings say about it; every prediction is in seconds."""

    prefill: OnlineFit = field(default_factory=prefill_fit)
    decode: OnlineFit = field(default_factory=decode_fit)
    transfer: OnlineFit = field(default_factory=transfer_fit)
    load: OnlineFit = field(default_factory=load_fit)

    # observations --------------------------------------------------------------
    def saw_prefill(self, tokens: int, seconds: float, cached: int = 0) -> None:
        """A prefill of ``tokens`` uncached prompt tokens, after ``cached`` found cached, took ``seconds``."""
        self.prefill.add((1.0, tokens, tokens * (tokens + 2 * cached)), seconds)

    def saw_decode_step(self, batch: int, context_tokens: int, seconds: float) -> None:
        self.decode.add(decode_features(batch, context_tokens), seconds)

    def saw_transfer(self, nbytes: int, seconds: float) -> None:
        self.transfer.add((1.0, nbytes), seconds)

    def saw_load(self, tokens: int, disk_tokens: int, seconds: float) -> None:
        """A prefill that loaded ``tokens`` from the KV store, ``disk_tokens`` of them promoted from
        disk, took ``seconds`` longer than its computed part predicts."""
        self.load.add((1.0, tokens, disk_tokens), seconds)

    def queue_s(self, queued_prompts: Sequence[int]) -> float:
        """Time until a prefill queued behind these (uncached token counts) starts."""
        return sum(self.prefill_s(n) for n in queued_prompts)

    def ready(self, min_samples: int = 3) -> bool:
        return self.prefill.samples >= min_samples or self.decode.samples >= min_samples

    def state(self) -> dict[str, object]:
        return {"prefill": self.prefill.state(), "decode": self.decode.state(), "transfer": self.transfer.state(),
                "load": self.load.state()}

    @classmethod
    def from_state(cls, st: dict) -> NodeModel:
        """ValueError when a fit's terms are not this version's. A decode fit saved as the line it
        was before the hinge (an older profile file) is read as that line: the hinge's statistics
        zero, so its coefficient stays 0 until samples come."""
        st = dict(st)
        if "decode" in st and list(st["decode"].get("names", ())) == list(DECODE_TERMS[:3]):
            st["decode"] = _with_hinge(st["decode"])
        fits = {name: OnlineFit.from_state(st[name]) for name in FITS if name in st}
        terms = {name: f.names for name, f in cls().named()}
        for name, f in fits.items():
            if f.names != terms[name]:
                raise ValueError(f"the {name} fit's terms are {list(f.names)}, not {list(terms[name])}")
        return cls(fits["prefill"], fits["decode"], fits["transfer"], fits.get("load") or load_fit())


def _with_hinge(line: dict) -> dict:
    """A saved three-term decode fit (``OnlineFit.state()``) as the four-term one, the hinge unseen."""
    xtx = [[float(v) for v in row] + [0.0] for row in line["xtx"]] + [[0.0] * 4]
    return {**line, "names": list(DECODE_TERMS), "scale": [*line["scale"], decode_fit().scale[3]], "xtx": xtx,
            "xty": [*line["xty"], 0.0]}


@dataclass(frozen=True)
class FitView:
    """A fit's coefficients, as a node reports them; predicts like the fit."""

    terms: tuple[str, ...]
    coefficients: tuple[float, ...]
    samples: int

    def predict(self, x: Sequence[float]) -> float:
        return sum(c * v for c, v in zip(self.coefficients, x))

    @cached_property
    def c4(self) -> tuple[float, float, float, float]:
        """The first four coefficients (zeros for those it lacks: a decode fit reported without the
        hinge is a line)."""
        c = tuple(self.coefficients[:4])
        return c + (0.0,) * (4 - len(c))  # type: ignore[return-value]

    @cached_property
    def c3(self) -> tuple[float, float, float]:
        """The first three coefficients (zeros for those it lacks): ``ModelView``'s predictions,
        made hundreds of times a request by admission, unrolled."""
        c = tuple(self.coefficients[:3])
        return c + (0.0,) * (3 - len(c))  # type: ignore[return-value]


_EMPTY = FitView((), (), 0)


@dataclass(frozen=True)
class ModelView(_Predicts):
    """A node's model as the coordinator sees it: coefficients only (see ``NodeModel``)."""

    prefill: FitView = _EMPTY
    decode: FitView = _EMPTY
    transfer: FitView = _EMPTY
    load: FitView = _EMPTY

    # ``_Predicts``' predictions unrolled (the same sums): admission makes hundreds a request.
    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        c0, c1, c2 = self.prefill.c3
        return c0 + c1 * tokens + c2 * (tokens * (tokens + 2 * cached))

    def step_s(self, batch: int, context_tokens: int) -> float:
        return decode_step_s(self.decode.c4, batch, context_tokens)

    def transfer_s(self, nbytes: int) -> float:
        c0, c1, _ = self.transfer.c3
        return c0 + c1 * nbytes

    def store_load_s(self, tokens: int, disk_tokens: int = 0) -> float:
        c0, c1, c2 = self.load.c3
        return c0 + c1 * tokens + c2 * disk_tokens if tokens > 0 else 0.0

    @classmethod
    def of(cls, model: NodeModel) -> ModelView:
        def view(f: OnlineFit) -> FitView:
            return FitView(f.names, tuple(f.coefficients()), f.samples) if f.samples else _EMPTY

        return cls(**{name: view(f) for name, f in model.named()})


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1}


def kv_bytes_per_token(layout: dict) -> int:
    """K and V of every layer for one token, from a node's KV layout (its etcd record);
    0 when the layout does not say."""
    try:
        per = 2 * int(layout["num_layers"]) * int(layout["num_kv_heads"]) * int(layout["head_size"])
        return per * DTYPE_BYTES[str(layout["dtype"])]
    except (KeyError, TypeError, ValueError):
        return 0
