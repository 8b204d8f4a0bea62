"""`tandem bench compare`'s report: results.json turned into report.md and its plots (the
comparison itself is bench/compare.py)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

GOAL = 0.9  # the SLO attainment that counts as serving a rate (DistServe goodput)


TABLED = ("ttft_replay",)  # systems' facts the report shows in a table of their own, not in the list
REPLAY_FORMS = (("model", "none"), ("factor", "a factor"), ("line", "a line whenever there is one"),
                ("calibration", "as shipped"))


def _replay_lines(systems: list[dict[str, Any]]) -> list[str]:
    """The TTFT calibration replayed on each Tandem system's own requests (its ``ttft_replay``
    fact): whether the calibration as shipped helps or hurts on this run, per kind of prefill."""
    rows = [(s["name"], where, r) for s in systems for where, r in s.get("facts", {}).get("ttft_replay", {}).items()]
    if not rows:
        return []
    out = ["", "Admission's TTFT error replayed on the run's own requests with each calibration form (each "
           "prediction through the calibration its node had learned from the requests finished before it "
           "arrived; `python -m tandem.bench.forecast LOG`; p50 / p90, every rate pooled):", "",
           "| system | prefilled on | requests | " + " | ".join(name for _, name in REPLAY_FORMS) + " |",
           "|---|---|---:|" + "---:|" * len(REPLAY_FORMS)]
    for name, where, r in rows:
        cells = [f"{r[f'{k}_p50']:.0%} / {r[f'{k}_p90']:.0%}" if f"{k}_p90" in r else "–" for k, _ in REPLAY_FORMS]
        out.append(f"| {name} | {where} | {int(r.get('requests', 0))} | " + " | ".join(cells) + " |")
    return out


def save_plot(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_line(doc: dict[str, Any]) -> str:
    mem = doc.get("memory") or {}
    if not mem:
        return ""
    dec = mem.get("decode_kv_cache_gib", mem["kv_cache_gib"])
    line = (f"KV memory: each engine's cache {mem['kv_cache_gib']:g} GiB" if dec == mem["kv_cache_gib"] else
            f"KV memory: each prefill engine's cache {mem['kv_cache_gib']:g} GiB, each decode engine's {dec:g} GiB")
    if mem["kvstore_ram_gib"]:
        line += (f"; Tandem's nodes a KV store RAM tier of {mem['kvstore_ram_gib']:g} GiB each"
                 f"{' over a disk tier' if mem['kvstore_disk'] else ''}")
    totals = mem.get("tandem_kv_gib")
    if totals:  # since sitting 9: colocated vLLM gets all the KV memory of the largest Tandem cluster
        line += (f"; all of Tandem's KV memory (engines and RAM tiers) {', '.join(f'{v:g} GiB at {k}' for k, v in totals.items())}"
                 f"; colocated vLLM's one cache {mem['colocated_kv_gib']:g} GiB (as much)")
    elif mem["kvstore_ram_gib"]:
        line += f"; colocated vLLM's cache {mem['colocated_kv_gib']:g} GiB (one engine cache plus one RAM tier)"
    line += f". Working set: {doc['prefixes']} prefixes / conversations" if doc.get("prefixes") else ""
    if doc.get("warm_prefixes") and doc.get("workload") == "multi-turn":
        line += (" (conversations already under way, 0 to 3/4 of the context each, the same for every probe and "
                 "each sent once before the sweep: steady state, not each probe's first turns)")
    elif doc.get("warm_prefixes"):
        line += (" (one corpus of prefixes for every probe, each prefix sent once before the sweep: steady state, "
                 "not each probe's first sights)")
    return line + "."


def write_report(out: Path, doc: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = doc["systems"]
    for s in systems:  # overload probes apart from the sweep (results written before kept them in it)
        s.setdefault("overload", [r for r in s["sweep"] if "x_goodput" in r])
        s["sweep"] = sorted((r for r in s["sweep"] if "x_goodput" not in r), key=lambda r: r["rate"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in systems:
        rates = [r["rate"] for r in s["sweep"]]
        ax.errorbar(rates, [r["attainment_median"] for r in s["sweep"]],
                    yerr=[[r["attainment_median"] - r["attainment_min"] for r in s["sweep"]],
                          [r["attainment_max"] - r["attainment_median"] for r in s["sweep"]]],
                    marker="o", capsize=3, label=s["name"])
    ax.axhline(GOAL, color="red", linestyle="--", label="90%")
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_plot(fig, out / "attainment_vs_rate.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    shown_rate = doc["rates"][len(doc["rates"]) // 2]
    for s in systems:
        probed = [r for r in s["sweep"] if r["rate"] <= shown_rate]
        if not probed:
            continue
        mid = probed[-1]
        for ax, key in zip(axes, ("ttft_values", "tpot_values")):
            xs = sorted(v for rep in mid["reps"] for v in rep[key])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label=f"{s['name']} @ {mid['rate']} req/s")
    for ax, name, slo in zip(axes, ("TTFT (s)", "TPOT (s)"), (doc["slo"]["ttft_s"], doc["slo"]["tpot_s"])):
        ax.axvline(slo, color="red", linestyle="--", label="SLO")
        ax.set_xlabel(name + ", log scale")
        ax.set_xscale("log")  # one system 100x slower must not flatten the others against zero
        ax.set_ylabel("share of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_plot(fig, out / "latency_cdfs.png")

    if any(s["overload"] for s in systems):
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in systems:
            rows = sorted((r for r in s["sweep"] + s["overload"] if "in_slo_rps" in r), key=lambda r: r["rate"])
            ax.plot([r["rate"] for r in rows], [r["in_slo_rps"] for r in rows], marker="o", label=s["name"])
        top = max(r["rate"] for s in systems for r in s["sweep"] + s["overload"])
        ax.plot([0, top], [0, top], color="grey", linestyle=":", label="everything in SLO")
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("requests/s within both SLOs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        save_plot(fig, out / "in_slo_vs_rate.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([s["name"] for s in systems], [s["goodput_rps"] for s in systems])
    ax.set_ylabel("goodput (req/s)")
    ax.set_title("DistServe goodput from the rate sweep")
    save_plot(fig, out / "goodput.png")

    base = next((s for s in systems if s["name"] == "vllm-colocated"), None)
    client_peak = max((rep["client_cpu_share"] for s in systems for r in s["sweep"] for rep in r["reps"]),
                      default=0.0)
    lines = ["# tandem bench compare", "",
             f"Machine: {doc['machine']}. Model: `{doc['model']}` ({doc['model_params_m']:.1f} M parameters, "
             f"float32). Workload `{doc['workload']}`, {doc['duration_s']} s of arrivals per probe, "
             f"{doc['reps']} repetition(s) per rate, rates {doc['rates']} req/s.",
             f"SLO: TTFT {doc['slo']['ttft_s']:.3f} s, TPOT {doc['slo']['tpot_s']:.4f} s ({doc['slo']['how']}).",
             _memory_line(doc),
             f"Client: {doc['client']}; its CPU use was at most {client_peak:.0%} of a core in any probe.",
             "Goodput here is the DistServe kind, read off the sweep: the highest swept rate at which the "
             "median attainment is at least 90%.", "",
             "| system | goodput (req/s) | vs colocated vLLM | " + " | ".join(f"attain. @ {r}" for r in doc["rates"])
             + " |", "|---|---:|---:|" + "---:|" * len(doc["rates"])]
    for s in systems:
        ratio = (f"{s['goodput_rps'] / base['goodput_rps']:.2f}x" if base and base["goodput_rps"] > 0
                 else "n/a")
        by_rate = {r["rate"]: r for r in s["sweep"]}
        cells = [f"{by_rate[rate]['attainment_median']:.0%} ({by_rate[rate]['attainment_min']:.0%}–"
                 f"{by_rate[rate]['attainment_max']:.0%})" if rate in by_rate else "not probed (0% below)"
                 for rate in doc["rates"]]
        lines.append(f"| {s['name']} | {s['goodput_rps']:.2f} | {ratio} | " + " | ".join(cells) + " |")
    for f in doc.get("failed", []):
        lines += ["", f"**{f['name']} did not start**, so it has no results in this run:", "", "```",
                  f["error"], "```"]
    lines += ["", "Per system and rate (medians over the repetitions): requests refused by admission, and the "
              "served ones that missed all the same, by a late first token or over the TPOT objective (a "
              "request late in both counts as late); share prefilled on a decode node, and Tandem's "
              "prediction error |actual - predicted| / actual "
              "(client-side TTFT/TPOT against what admission predicted), p50 / p90, and in brackets the median "
              "signed error (predicted - actual) / actual: below 0, predictions too low. The last column: the "
              "TPOT error of the requests that finished before the last served request of the probe was sent (requests "
              "kept arriving over their whole decode, as in a cluster's steady state).", "",
              "| system | rate | refused (of them: not even on an idle node) | served, first token late | "
              "served, over TPOT | local prefill | served on a prefill node | TTFT error p50 / p90 | TPOT error p50 / p90 | "
              "TPOT error, arrivals on |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in systems:
        for r in s["sweep"]:
            reps = r["reps"]

            def med(f: Any) -> float:
                vals = [v for v in (f(rep) for rep in reps) if v == v]  # NaN: not reported
                return statistics.median(vals) if vals else float("nan")

            refused = med(lambda rep: rep["rejected"] / rep["requests"] if rep["requests"] else 0.0)
            hopeless = med(lambda rep: rep.get("rejected_hopeless", 0) / rep["requests"] if rep["requests"] else 0.0)
            local = med(lambda rep: rep.get("local_prefill_share", float("nan")))
            colocated = med(lambda rep: rep.get("colocated_share", float("nan")))
            err = {k: (med(lambda rep, k=k: rep["prediction_error"].get(k, {}).get("p50", float("nan"))),
                       med(lambda rep, k=k: rep["prediction_error"].get(k, {}).get("p90", float("nan"))),
                       med(lambda rep, k=k: rep["prediction_error"].get(k, {}).get("bias", float("nan"))))
                   for k in ("ttft", "tpot", "tpot_arriving")}  # (results from before it was counted: –)
            late = [med(lambda rep, k=k: rep["missed"][k] / rep["requests"] if "missed" in rep and rep["requests"]
                        else float("nan")) for k in ("ttft", "tpot")]  # (results from before it was counted: –)
            cells = [f"{refused:.0%} ({hopeless:.0%})", *("–" if v != v else f"{v:.0%}" for v in late),
                     *("–" if v != v else f"{v:.0%}" for v in (local, colocated))]
            cells += ["–" if e[0] != e[0] else f"{e[0]:.0%} / {e[1]:.0%}" + ("" if e[2] != e[2] else f" ({e[2]:+.0%})")
                      for e in (err["ttft"], err["tpot"], err["tpot_arriving"])]
            lines.append(f"| {s['name']} | {r['rate']} | " + " | ".join(cells) + " |")
    if doc.get("ttft_tiers"):
        lines += ["", f"SLO tiers: each request's TTFT objective is {' or '.join(f'{k:g}x' for k in doc['ttft_tiers'])} "
                  "the run's (seeded, equal shares). Attainment per tier (medians over the repetitions):", "",
                  "| system | rate | " + " | ".join(f"TTFT {k:g}x" for k in doc["ttft_tiers"]) + " |",
                  "|---|---:|" + "---:|" * len(doc["ttft_tiers"])]
        for s in systems:
            for r in s["sweep"]:
                cells = []
                for k in doc["ttft_tiers"]:
                    key = f"{doc['slo']['ttft_s'] * k * 1000:.0f}"
                    vals = [rep["attainment_by_ttft_slo"][key] for rep in r["reps"]
                            if key in rep.get("attainment_by_ttft_slo", {})]
                    cells.append(f"{statistics.median(vals):.0%}" if vals else "–")
                lines.append(f"| {s['name']} | {r['rate']} | " + " | ".join(cells) + " |")
    if doc.get("overload"):
        ks = [k for k, _ in doc["overload"]]
        base = (f"the goodput of {systems[0]['name']}" if systems[0]["goodput_rps"] > 0 else
                f"the lowest swept rate ({systems[0]['name']} met the goal at none)")
        lines += ["", f"Overload: probes at {', '.join(f'{k:g}x' for k in ks)} {base} "
                  f"({', '.join(f'{r:g}' for _, r in doc['overload'])} req/s), every "
                  "system at the same rates. In-SLO throughput: requests per second that met both SLOs "
                  "(medians over the repetitions); the last column, at the highest multiple against the "
                  "system's peak in-SLO throughput anywhere in the run (the goal with admission on: >= 90 %).",
                  "", "| system | " + " | ".join(f"in-SLO req/s @ {k:g}x" for k in ks)
                  + f" | @ {ks[-1]:g}x vs peak |", "|---|" + "---:|" * (len(ks) + 1)]
        for s in systems:
            by_k = {r["x_goodput"]: r for r in s["overload"]}
            peak = max((r["in_slo_rps"] for r in s["sweep"] + s["overload"] if "in_slo_rps" in r), default=0.0)
            cells = [f"{by_k[k]['in_slo_rps']:.2f}" if k in by_k else "–" for k in ks]
            last = by_k.get(ks[-1])
            held = f"{last['in_slo_rps'] / peak:.0%}" if last and peak > 0 else "–"
            lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {held} |")
        lines += ["", "![in-SLO throughput](in_slo_vs_rate.png)"]
    cached = [s for s in systems if "prefill_token_hit_rate" in s.get("facts", {})]
    if cached:
        lines += ["", "Prompt tokens the prefill nodes (at 0:N the decode nodes; colocated vLLM: its one engine) found "
                  "computed already (engine prefix cache or KV store) over the whole run, the streams the engines "
                  "preempted (out of KV blocks), and how the prefills spread over the nodes:", "",
                  "| system | goodput (req/s) | prompt tokens cached | KV store chunk hit rate | engine preemptions "
                  "| prefills per node |",
                  "|---|---:|---:|---:|---:|---|"]
        for s in cached:
            f = s["facts"]
            store = f"{f['kvstore_chunk_hit_rate']:.1%}" if "kvstore_chunk_hit_rate" in f else "–"
            spread = ", ".join(f"{n}: {c}" for n, c in sorted(f.get("prefills_per_node", {}).items()))
            lines.append(f"| {s['name']} | {s['goodput_rps']:.2f} | {f['prefill_token_hit_rate']:.1%} | {store} | "
                         f"{f.get('engine_preemptions', '–')} | {spread} |")
    lines += _replay_lines(systems)
    lines += ["", "Prediction error per node (TTFT by the node that prefilled, TPOT by the decode node; "
              "p50 / p90, every request of every rate pooled):", ""]
    for s in systems:
        per: dict[str, dict[str, list[float]]] = {}
        for r in s["sweep"] + s["overload"]:
            for rep in r["reps"]:
                for metric, nodes in rep.get("prediction_error_by_node", {}).items():
                    for node, e in nodes.items():
                        per.setdefault(f"{metric} {node}", {"p50": [], "p90": []})
                        per[f"{metric} {node}"]["p50"].append(e["p50"])
                        per[f"{metric} {node}"]["p90"].append(e["p90"])
        if per:
            lines.append(f"- {s['name']}: " + ", ".join(
                f"{key} {statistics.median(v['p50']):.0%} / {statistics.median(v['p90']):.0%}"
                for key, v in sorted(per.items())))
    lines += ["", "![attainment](attainment_vs_rate.png)", "", "![latency](latency_cdfs.png)", "",
              "![goodput](goodput.png)", "", "## Systems as run", ""]
    for s in systems:
        lines.append(f"- **{s['name']}** ({s['version']}):")
        lines += [f"  - `{' '.join(c)}`" for c in s["commands"]]
        lines += [f"  - note: {n}" for n in s.get("notes", [])]
        lines += [f"  - {k.replace('_', ' ')}: {v}" for k, v in s.get("facts", {}).items() if k not in TABLED]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
