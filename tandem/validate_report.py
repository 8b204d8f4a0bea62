"""`tandem plan --validate`'s report (tandem/plan_validate.py runs it): each rate's measured
against simulated figures and misses by cause, the repetitions' means and spread, the nodes'
measured speeds, what the simulator said without what it models, the goodput, and what
`tandem plan` says of the split. ``validate.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tandem.nodespeed import MIN_WINDOWS, Speed
from tandem.plan import MIN_DURATION_S
from tandem.sim import SPEED_DRAWS
from tandem.simconfig import COLOCATE_OFF, LOCAL_OFF, NO_PREFIX_CACHE, NOT_MODELLED

STRAY_KEYS = ("attainment", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")


def describe(local: bool, admission: bool = False, colocate: bool = False) -> str:
    how = ("a request prefilled on the decode node where the coordinator chooses to" if local
           else "always disaggregated")
    whole = ", colocation on" if colocate else ", colocation off"
    shipped = " (as shipped)" if local and admission and colocate else ""
    return f"{'admission on' if admission else 'admission off'}, {how}{whole}{shipped}"


MISSES = ("refused", "ttft", "tpot")  # the reasons a report shows (failures are a column of their own)


def misses(counts: dict[str, int]) -> str:
    """Requests missed by why, as ``refused-TTFT-TPOT`` counts (a dash: not known)."""
    return "–" if not counts else "-".join(f"{round(counts.get(k, 0), 1):g}" for k in MISSES)


def pct(v: float | None) -> str:
    """A share or an error as a percentage; a dash for none."""
    return "–" if v is None or math.isnan(v) else f"{v:.0%}"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    def ms(v: float) -> str:
        return "–" if v is None or math.isnan(v) else f"{v * 1000:.0f}"

    lines = ["| req/s | attainment measured / predicted | TTFT p50 ms m / p (err) | TTFT p90 ms m / p (err) | "
             "TPOT p50 ms m / p (err) | TPOT p90 ms m / p (err) | prefilled on the decode node m / p | "
             "served whole on a prefill node m / p | missed: refused-TTFT-TPOT m / p |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, p, e = r["measured"], r["predicted"], r["error"]
        loc, whole = r.get("local_share", {}), r.get("colocated_share", {})
        lines.append(f"| {r['rate']:g} | {m['attainment']:.0%} / {p['attainment']:.0%} | "
                     + " | ".join(f"{ms(m[k])} / {ms(p[k])} ({pct(e[k])})"
                                  for k in ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s"))
                     + f" | {pct(loc.get('measured'))} / {pct(loc.get('predicted'))} | "
                     f"{pct(whole.get('measured'))} / {pct(whole.get('predicted'))} | "
                     f"{misses(r.get('missed', {}).get('measured', {}))} / "
                     f"{misses(r.get('missed', {}).get('predicted', {}))} |")
    return lines


def reps_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``over_reps``' rows as a table: the means (their error), each figure's range of single errors."""
    def val(k: str, v: float) -> str:  # attainment in per cent, TTFT in whole ms, TPOT to a tenth
        if k == "attainment" or math.isnan(v):
            return pct(v)
        return f"{v * 1000:.0f}" if k.startswith("ttft") else f"{v * 1000:.1f}"

    def fig(r: dict[str, Any], k: str) -> str:
        lo, hi = r["error_range"][k]
        spread = "–" if math.isnan(lo) else f"{pct(lo)}–{pct(hi)}"
        return f"{val(k, r['measured'][k])} / {val(k, r['predicted'][k])} ({pct(r['error'][k])}; {spread})"

    lines = ["| req/s | reps | attainment m / p | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | TPOT p90 ms | "
             "missed in all: refused-TTFT-TPOT m / p |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rate']:g} | {r['reps']} | " + " | ".join(fig(r, k) for k in STRAY_KEYS)
                     + f" | {misses(r['missed']['measured'])} / {misses(r['missed']['predicted'])} |")
    return lines


def _speed_measured(row: dict[str, Any]) -> bool:
    """Whether the simulator ran this rate's nodes at a speed the real nodes had measured (not
    exactly at their fits)."""
    return any(Speed(*v).varies for v in row.get("speed", {}).values())


def write_report(out: Path, doc: dict[str, Any]) -> None:
    how = describe(doc.get("conditional_disagg", False), doc.get("admission", False), doc.get("colocate", False))
    lines = [f"# tandem plan --validate: {doc['workload']}, {doc.get('split', '1:1')} on this host", "",
             f"SLOs TTFT ≤ {doc['slo']['ttft_s'] * 1000:.0f} ms, TPOT ≤ {doc['slo']['tpot_s'] * 1000:.0f} ms; "
             f"{doc['duration_s']:g} s of arrivals per rate; the same seeded trace to the real cluster "
             f"({how}) and to the simulator, "
             "whose times come from "
             + ("the fits the nodes had learned while serving, read before each rate (a pool's averaged)"
                if doc.get("fits") == "learned" else "the profiles the nodes started from (a pool's averaged)")
             + ". Goal: " + doc["goal"] + ".", ""]
    if "kv_capacity_tokens" in doc:
        engines = (f"the prefill engine's cache {doc['prefill_cache_tokens']:,} tokens, the decode engine's "
                   f"{doc['kv_capacity_tokens']:,}" if not doc.get("split", "1:1").startswith("0:")
                   else f"each decode engine's cache {doc['kv_capacity_tokens']:,} tokens")
        lines += [f"KV memory, the same on both sides: {engines}"
                  + (f", a KV store on each node: RAM {doc['store_ram_tokens']:,} tokens"
                     + (" over a disk tier" if doc.get("store_disk") else "") if doc.get("store_ram_tokens") else "")
                  + ("" if doc.get("prefix_cache") else "; the simulator's prefix caches off") + ".", ""]
    reps = doc.get("reps", 1)
    if reps > 1:
        for rep in range(reps):
            lines += [f"Repetition {rep + 1} (seeds from {7000 + 1000 * rep}):", "",
                      *table_lines([r for r in doc["rows"] if r.get("rep") == rep]), ""]
        lines += [f"The mean over the {reps} repetitions, and in brackets the error of the means; then the "
                  "smallest and largest error of one repetition:", "", *reps_lines(doc["over_reps"])]
    else:
        lines += table_lines(doc["rows"])
    speeds = [(r["rate"], r["speed"]) for r in doc["rows"] if _speed_measured(r)]
    pool_less = doc.get("split", "1:1").startswith("0:")  # (no prefill pool: the decode nodes' speed only)
    if speeds:
        lines += ["", "The simulator's nodes strayed from their fits as the real nodes measured their own work "
                  "straying (tandem/nodespeed.py; each rate's figure the mean over "
                  f"{SPEED_DRAWS} draws): " + "; ".join(
                      f"before {rate:g} req/s "
                      + ("" if pool_less else f"prefill {Speed(*sp['prefill']).describe()}, ")
                      + f"decode {Speed(*sp['decode']).describe()}" for rate, sp in speeds) + "."]
    unmeasured = sorted({r["rate"] for r in doc["rows"] if not _speed_measured(r)})
    if doc.get("fits") == "learned" and unmeasured:
        lines += ["", "No node had measured its speed yet before " + ", ".join(f"{r:g}" for r in unmeasured)
                  + f" req/s (a node needs {MIN_WINDOWS} one-second windows with work first): there the "
                  "simulator's nodes ran exactly at their fits, steadier than the real ones."]
    for key, what in (("predicted_at_fit", "the nodes' speeds varying (every node exactly at its fit)"),
                      ("predicted_uncalibrated", "the coordinator's calibration (every prediction raw)"),
                      ("predicted_without_kv_store", "the KV store"),
                      ("predicted_without_prefix_cache", "the engines' prefix caches (and the KV store)")):
        bare = [r for r in doc["rows"] if key in r]
        if bare:
            lines += ["", f"Without {what} the simulator would have said (TTFT p50 / p90, TPOT p50 ms, "
                      "attainment): " + "; ".join(
                          f"{r['rate']:g} req/s {b['ttft_p50_s'] * 1000:.0f} / {b['ttft_p90_s'] * 1000:.0f}, "
                          f"{b['tpot_p50_s'] * 1000:.0f}, {b['attainment']:.0%}" for r in bare for b in [r[key]]) + "."]
    g = doc["goodput"]
    lines += ["", f"Goodput on these rates{' (' + g['of'] + ')' if 'of' in g else ''}: measured {g['measured']:g} "
              f"req/s, predicted {g['predicted']:g} req/s.",
              "", "Not modelled: " + ", ".join([*NOT_MODELLED, *([] if doc.get("conditional_disagg") else [LOCAL_OFF]),
                                                 *([] if doc.get("colocate") else [COLOCATE_OFF]),
                                                 *([] if doc.get("prefix_cache", True) else [NO_PREFIX_CACHE])]) + "."]
    if (pl := doc.get("planner")) is not None:
        lines += ["", f"`tandem plan` on the nodes' startup profiles (its own probes of "
                  f"{MIN_DURATION_S:g} s or more, not these traces) puts this split's goodput at "
                  f"{pl['goodput_rps']:.3g} req/s (then {pl['limited_by']} gives out); its attainment at these rates: "
                  + ", ".join(f"{rate} req/s {pct(a)}" for rate, a in pl["attainment"].items()) + "."]
    if not doc["transfer_modelled"] and doc.get("fits") != "learned":
        lines.append("The decode node's profile has no KV transfer timings (a node's startup profile has none; "
                     "`tandem profile` adds them): transfers take no time in the simulator.")
    (out / "validate.md").write_text("\n".join(lines) + "\n")
