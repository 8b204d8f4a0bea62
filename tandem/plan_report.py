"""`tandem plan`'s report (tandem/plan.py's search writes it): plan.json, plan.md with each
split's goodput and what gives out first, and plan.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tandem.nodespeed import Speed


def table(doc: dict[str, Any]) -> list[str]:
    lines = ["| P:D | goodput req/s | per node | TTFT p90 at goodput | TPOT p90 at goodput | gives out first | "
             "highest attainment probed |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in doc["rows"]:
        at = r.get("at_goodput") or {}

        def ms(v: float | None) -> str:
            return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1000:.0f} ms"

        best = " (best)" if f"{r['prefill']}:{r['decode']}" == doc["best"] else ""
        lines.append(f"| {r['prefill']}:{r['decode']}{best} | {r['goodput_rps']:.3g} | {r['per_node_rps']:.3g} | "
                     f"{ms(at.get('ttft_p90_s'))} | {ms(at.get('tpot_p90_s'))} | {r['limited_by']} | "
                     f"{ceiling(r):.0%} |")
    return lines


SENSITIVE_POINTS = 0.05  # a split whose attainment never gets this far above the target: a flat curve


def ceiling(row: dict[str, Any]) -> float:
    """The highest attainment a split reached in any probe (at low load: the requests it can never
    serve in time, e.g. prompts no node prefills within the TTFT objective, are what it misses)."""
    return max((a for _, a in row["probes"]), default=0.0)


def sensitivity_note(doc: dict[str, Any]) -> list[str]:
    """A warning where the best split's attainment curve stays close to the 90 % target: its
    goodput (where the curve crosses the target) then moves a lot with a few points of error."""
    best = [r for r in doc["rows"] if f"{r['prefill']}:{r['decode']}" == doc["best"]]
    if not best or ceiling(best[0]) >= 0.9 + SENSITIVE_POINTS:
        return []
    return [f"**Read the goodput with care**: {doc['best']} never gets above {ceiling(best[0]):.0%} of requests "
            "in SLO, even at low load, so its curve crosses the 90 % target at a shallow angle and a few points "
            "of error in attainment move its goodput by much more (see plan.png). Compare attainment at the "
            "rates you mean to run (`tandem plan --validate` measures it).", ""]


def write_report(out: Path, doc: dict[str, Any]) -> Path:
    """plan.json and plan.md, then plan.png (when matplotlib is installed: the `dev` extra)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(doc, indent=1) + "\n")
    plotted = _plot(out / "plan.png", doc)
    slo = doc["slo"]
    kv = f", in a KV cache of {doc['kv_capacity_tokens']} tokens" if doc["kv_capacity_tokens"] else ""
    verdict = (f"**Best: {doc['best']}.**" if doc["best"] != "none" else
               "**No split meets the objectives for 90 % of requests at any rate tried**: the objectives are "
               "tighter than these nodes can serve this workload (see TTFT/TPOT above, and what gives out first).")
    md = [f"# tandem plan: {doc['workload']}, {doc['nodes']} nodes", "",
          f"SLOs: TTFT ≤ {slo['ttft_s'] * 1000:.0f} ms, TPOT ≤ {slo['tpot_s'] * 1000:.0f} ms, for ≥ 90 % of requests. "
          f"Simulated: at least {doc['requests_per_probe']} requests and {doc.get('min_duration_s', 0):g} s of "
          f"arrivals per probe, median of {doc['seeds']} seeds; "
          f"coordinator queue in {doc['order']} order; a decode node runs at most {doc['max_batch']} requests"
          f"{kv}.", "",
          f"Profiles: prefill nodes `{doc['prefill_profile']['source'] or 'given'}`, decode nodes "
          f"`{doc['decode_profile']['source'] or 'given'}`.", "",
          *table(doc), "", verdict, "", *sensitivity_note(doc),
          *([f"{doc['splits_evaluated']} of the {doc['splits']} splits evaluated: one in {doc['search_step']}, "
             "then every one within that step of the best of those.", ""]
            if doc.get("splits_evaluated", 0) < doc.get("splits", 0) else []),
          "Each goodput is a bisection to within 5 %: splits closer than that are not told apart. A probe "
          "meets the target only if the last third of its arrivals does too, is not clearly declining from the "
          "middle third, and the wait for a decode batch does not grow (a backlog that builds slowly).", "",
          "![plan](plan.png)" if plotted else "(plan.png needs matplotlib: pip install 'tandem-serve[dev]')", "",
          f"Admission: {'on (a request predicted to miss is refused, and counts as missed)' if doc.get('admission') else 'off (`--admission on` models it)'}. "
          f"Not modelled yet: {', '.join(doc['not_modelled'])}."]
    if (speed := Speed(*doc.get("node_speed", ()))).varies:
        md.append(f"Every node's times stray from its profile, unseen by admission: {speed.describe()} "
                     "(--node-speed).")
    if not doc["transfer_modelled"]:
        md.append("The decode profile has no KV transfer timings: transfers take no time here.")
    (out / "plan.md").write_text("\n".join(md) + "\n")
    return out / "plan.md"


def _plot(path: Path, doc: dict[str, Any]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = doc["rows"]
    if len(rows) <= 8:
        labels = [f"{r['prefill']}:{r['decode']}" for r in rows]
        ax1.bar(labels, [r["goodput_rps"] for r in rows], color="tab:blue")
        ax1.set_xlabel("prefill:decode")
        curves = rows
    else:  # many splits: goodput against the prefill nodes; attainment curves of the best few
        ax1.plot([r["prefill"] for r in rows], [r["goodput_rps"] for r in rows], marker="o", color="tab:blue")
        ax1.set_xlabel(f"prefill nodes (of {doc['nodes']}; the rest decode)")
        curves = sorted(sorted(rows, key=lambda r: -r["goodput_rps"])[:6], key=lambda r: r["prefill"])
    ax1.set_ylabel("simulated goodput, req/s")
    ax1.set_title(str(doc["workload"])[:60] + f" on {doc['nodes']} nodes")
    for r in curves:
        label = f"{r['prefill']}:{r['decode']}"
        pts = sorted(r["probes"])
        ax2.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=label)
    ax2.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax2.set_xlabel("arrival rate, req/s")
    ax2.set_ylabel("SLO attainment, %")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
