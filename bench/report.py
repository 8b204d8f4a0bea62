"""Markdown reports with PNG plots for benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def write_run_report(out: Path, result: dict[str, Any]) -> Path:
    """report.md (and latency_cdf.png when matplotlib is there) for one `tandem bench run`."""
    s = result["summary"]
    reqs = [r for r in result["requests"] if r["ok"] and r["first_token"] is not None]
    ttft = [r["first_token"] - r["sent"] for r in reqs]
    tpot = [(r["token_times"][-1] - r["first_token"]) / (r["output_tokens"] - 1)
            for r in reqs if r["output_tokens"] > 1 and r["token_times"]]
    plotted = False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        _cdf(a, ttft, "TTFT")
        _cdf(b, tpot, "TPOT")
        for ax, name, slo in ((a, "TTFT (s)", s["slo"]["ttft_s"]), (b, "TPOT (s)", s["slo"]["tpot_s"])):
            if slo is not None:
                ax.axvline(slo, color="red", linestyle="--", label="SLO")
            ax.set_xlabel(name)
            ax.set_ylabel("share of requests")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"{result['target']} — {result.get('workload', 'trace')} at {result.get('rate', '?')} req/s")
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=110)
        plt.close(fig)
        plotted = True
    except ImportError:
        pass
    ms = lambda d: f"{d['p50'] * 1000:.1f} / {d['p90'] * 1000:.1f} / {d['p99'] * 1000:.1f}"  # noqa: E731
    lines = [
        "# tandem bench run", "",
        f"Target `{result['target']}`, model `{result['model']}`, "
        + (f"workload `{result['workload']}` at {result['rate']} req/s for {result['duration_s']} s, seed {result['seed']}"
           if "workload" in result else f"trace `{result.get('trace')}`") + ".",
        f"Client CPU: {s['client_cpu_share']:.0%} of one core over the run.", "",
        "| metric | value |", "|---|---|",
        f"| requests (completed / failed) | {s['completed']} / {s['failed']} |",
        f"| throughput | {s['throughput_rps']:.3f} req/s, {s['output_tokens_per_s']:.1f} output tok/s |",
        f"| TTFT p50 / p90 / p99 (ms) | {ms(s['ttft_s'])} |",
        f"| TPOT p50 / p90 / p99 (ms) | {ms(s['tpot_s'])} |",
        f"| ITL p50 / p90 / p99 (ms) | {ms(s['itl_s'])} |",
        f"| E2E p50 / p90 / p99 (ms) | {ms(s['e2e_s'])} |",
        f"| SLO (TTFT, TPOT) | {s['slo']['ttft_s']} s, {s['slo']['tpot_s']} s |",
        f"| SLO attainment | {s['slo_attainment']:.1%} |",
        f"| goodput at this rate (vLLM's definition) | {s['goodput_at_rate_rps']:.3f} req/s |",
    ]
    if plotted:
        lines += ["", "![latency CDFs](latency_cdf.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
