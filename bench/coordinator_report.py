"""`tandem bench coordinator`'s report (coordinator_load.py measures): its Markdown tables and
plot, and how a probe's load side (the load generator and the simulated nodes) reads: its words
on the console, its cell in the tables, and whether it bounded the probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A probe whose load generator sent late or whose other cores were this busy measured the load side
# as much as the coordinator: its latencies are marked, not read as the coordinator's.
LOAD_LAG_MS = 5.0
LOAD_BUSY = 0.9


def load_bound(row: dict[str, Any]) -> bool:
    return row["send_lag_p99_ms"] > LOAD_LAG_MS or row.get("load_cores_busy", 0.0) >= LOAD_BUSY


def load_side_words(row: dict[str, Any]) -> str:
    busy = row.get("load_cores_busy")
    words = f"load side: send lag p99 {row['send_lag_p99_ms']:.1f} ms" + (
        "" if busy is None else f", its cores {busy:.0%} busy")
    return words + (" (load-bound: these latencies are not the coordinator's alone)" if load_bound(row) else "")


def write_report(out: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    floor = doc.get("floor_rows") or []
    modes = doc.get("node_calls") or ["call"]

    apis = doc.get("apis") or ["grpc"]

    def of(rs: list[dict[str, Any]], mode: str, api: str = "grpc") -> list[dict[str, Any]]:
        return [r for r in rs if r.get("node_calls", "call") == mode and r.get("api", "grpc") == api]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        for api in apis:
            mine = of(rows, mode, api)
            sent = [r["sent_rate"] for r in mine]
            if api == "grpc":  # (an HTTP stream carries no node timings: no added TTFT)
                a1.plot(sent, [r["added_ttft_p50_ms"] for r in mine], marker="o", label=f"p50, {mode}")
                a1.plot(sent, [r["added_ttft_p99_ms"] for r in mine], marker="o", label=f"p99, {mode}")
                if all(r.get("inside_p99_ms") is not None for r in mine):
                    a1.plot(sent, [r["inside_p99_ms"] for r in mine], marker="s",
                            label=f"p99 inside the coordinator, {mode}")
            a2.plot(sent, [r["cpu_us_per_request"] for r in mine], marker="o",
                    label=f"coordinator, {api}, --node-calls {mode}")
        base = of(floor, mode)
        if base and base[0].get("added_ttft_p99_ms") is not None:
            a1.plot([r["sent_rate"] for r in base], [r["added_ttft_p99_ms"] for r in base], marker="o",
                    linestyle="--", label=f"p99, grpc.aio alone ({mode})")
        if base:
            a2.plot([r["sent_rate"] for r in base], [r["cpu_us_per_request"] for r in base], marker="o",
                    linestyle="--", label=f"grpc.aio alone, the same calls ({mode})")
    a1.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="goal (p99)")
    a1.set_xlabel("requests/s sent")
    a1.set_ylabel("TTFT added by the coordinator, ms")
    a1.set_yscale("log")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    a2.set_ylim(bottom=0)
    a2.set_xlabel("requests/s sent")
    a2.set_ylabel("coordinator CPU per request, us")
    fig.tight_layout()
    fig.savefig(out / "coordinator.png", dpi=110)
    plt.close(fig)
    lines = ["# The coordinator under load (simulated nodes)", "",
             f"{doc['prefill_nodes']} prefill + {doc['decode_nodes']} decode simulated nodes (profile {doc['profile']}); "
             f"{doc['prompt_tokens']}-token prompts, {doc['output_tokens']} output tokens, stream interval "
             f"{doc.get('stream_interval', 1)}; the coordinator ({doc.get('workers', 1)} process(es)) on cores "
             f"{doc['coordinator_cores']}, nodes and load generator on {doc['other_cores']}. Goal: {doc['goal']}.", "",
             "`--node-calls stream`: the Prefill and Decode calls to each node as messages on one long-lived stream; "
             "`call`: a gRPC call each.", "",
             "`http`: the clients stream /v1/completions as server-sent events (no node timings come back, so "
             "no added TTFT; the TTFT is the client's, the simulated prefill's 2 ms in it).", "",
             "The load side (the load generator and the simulated nodes, on the other cores) is measured too: "
             "its send lag p99 (how late requests left against their Poisson times) and how busy its cores were. "
             f"A row marked † had a send lag p99 over {LOAD_LAG_MS:g} ms or its cores {LOAD_BUSY:.0%} busy: its "
             "latencies measured the load side as much as the coordinator.", "",
             "Inside: the part the coordinator timed, from its receipt of the request (after tokenizing) to "
             "the prefill call's going out and from the first token's return to its detokenizing (not the "
             "message's write); node call: the prefill call's time less the node's own.", "",
             "| api | node calls | asked req/s | sent req/s | added TTFT p50 | p99 | inside p50 | p99 | "
             "node call p50 | TTFT p50 | coordinator CPU | CPU/request | CPU/token | tokens/s | errors | "
             "load side: lag p99, busy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f} ms"

    def side(r: dict[str, Any]) -> str:
        busy = r.get("load_cores_busy")
        return (f"{r['send_lag_p99_ms']:.1f} ms, {'–' if busy is None else f'{busy:.0%}'}"
                f"{' †' if load_bound(r) else ''}")

    for r in rows:
        lines.append(f"| {r.get('api', 'grpc')} | {r.get('node_calls', 'call')} | {r['rate']:g} | {r['sent_rate']:.0f} | "
                     f"{ms(r['added_ttft_p50_ms'])} | {ms(r['added_ttft_p99_ms'])} | {ms(r.get('inside_p50_ms'))} | "
                     f"{ms(r.get('inside_p99_ms'))} | {ms(r.get('node_call_p50_ms'))} | {ms(r.get('ttft_p50_ms'))} | "
                     f"{r['coordinator_cpu_share']:.0%} | {r['cpu_us_per_request']:.0f} us | "
                     f"{r['cpu_us_per_token']:.1f} us | {r['tokens_per_s']:.0f} | {r['errors']} | {side(r)} |")
    if floor:
        lines += ["", "The baseline in the same run, same core and rates: grpc.aio alone doing what a request "
                  "costs (the client's stream, a Prefill and a Decode: as calls, or as messages on one stream a "
                  "node) with the same messages and nothing else (bench/grpc_floor.py). Its added TTFT is what "
                  "the library and this load side add with no coordinator code at all.", "",
                  "| node calls | asked req/s | sent req/s | its added TTFT p50 | p99 | its CPU/request | "
                  "the coordinator's | Tandem's own (the difference) | load side: lag p99, busy |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in floor:
            r = next((r for r in rows if r.get("node_calls", "call") == b.get("node_calls", "call")
                      and r.get("api", "grpc") == "grpc" and r["rate"] == b["rate"]), None)
            if r is None:
                continue
            lines.append(f"| {b.get('node_calls', 'call')} | {b['rate']:g} | {b['sent_rate']:.0f} | "
                         f"{ms(b.get('added_ttft_p50_ms'))} | {ms(b.get('added_ttft_p99_ms'))} | "
                         f"{b['cpu_us_per_request']:.0f} us | {r['cpu_us_per_request']:.0f} us | "
                         f"{r['cpu_us_per_request'] - b['cpu_us_per_request']:.0f} us | {side(b)} |")
    lines += ["", "![coordinator](coordinator.png)", ""]
    if doc["top_functions"]:
        lines += [f"Where the coordinator's time goes at the highest rate ({apis[0]}, `--node-calls {modes[0]}`; "
                  "py-spy, samples "
                  "of the thread holding the GIL, by the function on top):", "",
                  "| function | share |", "|---|---:|"]
        lines += [f"| `{f}` | {s:.1%} |" for f, s in doc["top_functions"]]
    else:
        lines.append("(install py-spy for where the coordinator's time goes)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
