"""The streams prefill nodes serve whole (--colocate) and the prefill calls beside them, in a
coordinator log (``python -m tandem.bench.forecast LOG --slo-tpot-ms X`` prints it): how many went
over the TPOT objective, how their TPOT compares with what admission predicted, and how long the
prefill calls sent to the same node stalled each one's decode (a prefill call's span is read from its
finish line: it ends at the first token, ``prefill call`` seconds long), apart by whether the call
was admitted before the stream (known to admission) or after it."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from tandem.bench.forecast_work import overlap_s
from tandem.logs import log_time

WHOLE = re.compile(r"request (\S+): admitted, served whole on prefill node ")
FINISH = re.compile(r"^(\S+ \S+) .*request (\S+): \w+ after (\d+) tokens \(ttft ([\d.]+) s, tpot ([\d.]+) ms, "
                    r"e2e ([\d.]+) s, prefill (\S+)( \(local\))?, decode (\S+), .*prefill call ([\d.]+) s; "
                    r"predicted ttft ([\d.]+) s, tpot ([\d.]+) ms")
# the prefilling node's pace at admission (coordinator --pace; absent before the forty-seventh sitting)
PACE = re.compile(r"; pace x([\d.]+)( not applied)? from ([-+][\d.]+) ([\d.]+|inf) s old\)")
# of its predicted TTFT, the wait: for its turn in a prefill queue, and a batch request's in the batch queue
WAIT = re.compile(r"of the ttft waiting ([\d.]+) s[;)]")
# how long it waited before its prefill call went out (measured), and the TTFT calibration's learned
# factor in its prediction
DISPATCH = re.compile(r", dispatch ([\d.]+) s, prefill call ")
LEARNED = re.compile(r"learned factors x([\d.]+),")


@dataclass
class _Finished:
    rid: str
    start: float  # when it was received (its finish less its e2e), epoch seconds
    tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    prefill: str
    local: bool
    decode: str
    call_s: float
    predicted_tpot_s: float
    predicted_ttft_s: float
    # the node's pace at admission: (the factor, whether in predicted_ttft_s, its log deviation,
    # its age in seconds); None where the log does not say
    pace: tuple[float, bool, float, float] | None = None
    # of predicted_ttft_s, the wait before its prefill's turn; None where the log does not say
    predicted_wait_s: float | None = None
    dispatch_s: float | None = None  # the wait before its prefill call went out; None where the log does not say
    ttft_factor: float | None = None  # the learned factor in predicted_ttft_s; None where the log does not say


def read(path: str) -> tuple[list[_Finished], set[str]]:
    """The finished requests, and the ids of those admission served whole on a prefill node."""
    out, whole = [], set()
    for line in open(path, encoding="utf-8", errors="replace"):
        if w := WHOLE.search(line):
            whole.add(w.group(1))
            continue
        m = FINISH.search(line)
        if not m:
            continue
        end = log_time(m.group(1))
        e2e = float(m.group(6))
        p = PACE.search(line)
        pace = (float(p.group(1)), not p.group(2), float(p.group(3)), float(p.group(4))) if p else None
        w, d, f = WAIT.search(line), DISPATCH.search(line), LEARNED.search(line)
        out.append(_Finished(m.group(2), end - e2e, int(m.group(3)), float(m.group(4)), float(m.group(5)) / 1000, e2e,
                             m.group(7), bool(m.group(8)), m.group(9), float(m.group(10)),
                             float(m.group(12)) / 1000, float(m.group(11)), pace,
                             float(w.group(1)) if w else None, float(d.group(1)) if d else None,
                             float(f.group(1)) if f else None))
    return out, whole


def whole_streams(path: str, slo_tpot_s: float) -> dict[str, dict[str, float]]:
    """By outcome ("over" / "within" the TPOT objective): the streams served whole on a prefill node
    (admitted so, and prefilled and decoded there), their median TPOT actual and predicted (ms), and the median
    seconds of prefill calls on that node during their decode, those admitted before them and after.
    Empty without such streams."""
    reqs, whole = read(path)
    calls: dict[str, list[tuple[float, float, float]]] = {}  # node -> (admitted, call start, call end)
    for r in reqs:
        if not r.local:
            end = r.start + r.ttft_s
            calls.setdefault(r.prefill, []).append((r.start, end - r.call_s, end))
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[tuple[float, float, float, float]]] = {"over": [], "within": []}
    for r in reqs:
        # (served whole from its first leg to its last: a migration would have moved it to the decode pool)
        if r.rid not in whole or not (r.local and r.decode == r.prefill) or r.tokens < 2:
            continue
        a, b, spans = r.start + r.ttft_s, r.start + r.e2e_s, calls.get(r.decode, [])
        known = overlap_s(spans, a, b, admitted_before=r.start)
        later = overlap_s(spans, a, b) - known
        groups["over" if r.tpot_s > slo_tpot_s else "within"].append((r.tpot_s, r.predicted_tpot_s, known, later))
    for name, rows in groups.items():
        if rows:
            out[name] = {"streams": len(rows),
                         "tpot_ms_p50": statistics.median(x[0] for x in rows) * 1000,
                         "predicted_tpot_ms_p50": statistics.median(x[1] for x in rows) * 1000,
                         "stall_known_s_p50": statistics.median(x[2] for x in rows),
                         "stall_later_s_p50": statistics.median(x[3] for x in rows)}
    return out
