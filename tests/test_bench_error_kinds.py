"""bench/error_kinds.py on finish lines written as the coordinator writes them, with known errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.bench.error_kinds import errors, main, table


def finish(rid: str, ttft: float, tpot_ms: float, where: str, p_ttft: float, p_tpot_ms: float,
           wait_s: float = 0.0) -> str:
    return (f"2026-12-06 22:09:34,214 INFO coordinator tandem.coordinator.request: request {rid}: length after "
            f"205 tokens (ttft {ttft:.3f} s, tpot {tpot_ms:.1f} ms, e2e 5.703 s, {where}, migrations 0, "
            f"dispatch 0.002 s, prefill call 0.301 s; predicted ttft {p_ttft:.3f} s, tpot {p_tpot_ms:.1f} ms, "
            f"learned factors x1.0000, x1.0000, of the ttft waiting {wait_s:.3f} s)\n")


def test_errors_are_told_apart_by_where_the_prompt_ran(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "coordinator.log"
    log.write_text(
        "2026-12-06 22:09:33,000 INFO coordinator tandem.coordinator.admission: request b: admitted, served whole "
        "on prefill node prefill-0 ...\n"
        + finish("a", 0.500, 20.0, "prefill prefill-0, decode decode-0", 0.400, 25.0)  # call: 20 %, 25 %
        + finish("b", 0.200, 40.0, "prefill prefill-0 (local), decode prefill-0", 0.300, 30.0)  # whole: 50 %, 25 %
        + finish("c", 0.100, 10.0, "prefill decode-0 (local), decode decode-0", 0.110, 10.0)  # local: 10 %, 0
        + "2026-12-06 22:09:35,000 INFO coordinator tandem.coordinator.admission: request d: admitted ...\n"
        # a call predicted to wait 0.3 s for its turn: 40 %, and not among those with nothing queued
        + finish("e", 1.000, 20.0, "prefill prefill-0, decode decode-0", 0.600, 20.0, wait_s=0.3))
    e = errors([str(log)])
    assert e[("ttft", "call")] == pytest.approx([0.2, 0.4]) and e[("ttft", "whole")] == pytest.approx([0.5])
    assert e[("ttft", "lone")] == pytest.approx([0.2])
    assert e[("ttft", "local")] == pytest.approx([0.1])
    assert e[("tpot", "decode")] == pytest.approx([0.25, 0.0, 0.0]) and e[("tpot", "whole")] == pytest.approx([0.25])
    assert "| TTFT, served whole (prefill node) | 1, 50 / 50 % |" in table({"x": e})
    png = tmp_path / "e.png"
    main([f"x={log}", f"y={log},{log}", "--png", str(png)])
    out = capsys.readouterr().out
    assert "| TTFT, prefill calls | 2, 30 / 38 % | 4, 30 / 40 % |" in out
    assert "| TTFT, prefill calls nothing queued | 1, 20 / 20 % | 2, 20 / 20 % |" in out
    assert png.stat().st_size > 0


def test_ttft_predictions_replay_with_the_logged_pace_at_any_gain(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import math

    def paced(line: str, pace: str) -> str:
        return line.replace("waiting 0.000 s)", f"waiting 0.000 s; pace {pace})")

    dev = math.log(1.25)
    log = tmp_path / "coordinator.log"
    log.write_text(
        # not applied (--pace off): predicted 0.4 against 0.5 taken; a full gain of a fresh reading meets it
        paced(finish("a", 0.500, 20.0, "prefill prefill-0, decode decode-0", 0.400, 25.0),
              f"x1.1000 not applied from +{dev:.4f} 0.00 s old")
        # applied (x1.25 in 0.5): unpaced 0.4, against 0.4 taken
        + paced(finish("b", 0.400, 20.0, "prefill prefill-0, decode decode-0", 0.500, 25.0),
                f"x1.2500 from +{dev:.4f} 0.00 s old")
        # no reading (inf old): replayed as it was logged
        + paced(finish("c", 0.100, 10.0, "prefill decode-0 (local), decode decode-0", 0.110, 10.0),
                "x1.0000 not applied from +0.0000 inf s old"))
    assert errors([str(log)])[("ttft", "call")] == pytest.approx([0.2, 0.25])  # as logged
    assert errors([str(log)], gain=0.0)[("ttft", "call")] == pytest.approx([0.2, 0.0], abs=1e-4)
    full = errors([str(log)], gain=1.0, hold_s=4.0)
    assert full[("ttft", "call")] == pytest.approx([0.0, 0.25], abs=1e-4)
    assert full[("ttft", "local")] == pytest.approx([0.1])
    main([f"x={log}", "--pace-grid"])
    out = capsys.readouterr().out
    # (both calls had nothing queued: the second column repeats the first)
    assert "| x | 0.0 | 1 | 18.0 % | 18.0 % | – | 10.0 % |" in out
    assert "| x | 1.0 | 8 | 22.5 % | 22.5 % | – | 10.0 % |" in out


def test_the_floor_is_the_p90_at_the_best_factor_chosen_in_hindsight(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from tandem.bench.error_kinds import best_line, best_scale, lone_calls

    call = "prefill prefill-0, decode decode-0"
    log = tmp_path / "coordinator.log"
    # Calls with nothing queued, each predicted at 0.8 of what it took: a factor of 1.25 removes all
    # of it. A call that waited (predicted far off) and a local prefill do not count.
    log.write_text("".join(finish(f"r{i}", t, 20.0, call, 0.8 * t, 20.0) for i, t in enumerate((0.2, 0.3, 0.5, 0.9)))
                   + finish("q", 1.000, 20.0, call, 0.100, 20.0, wait_s=0.05)
                   + finish("l", 1.000, 20.0, "prefill decode-0 (local), decode decode-0", 0.100, 20.0))
    pairs = lone_calls([str(log)])
    assert len(pairs) == 4
    k, p90 = best_scale(pairs)
    assert k == pytest.approx(1.25, rel=0.01) and p90 < 0.01
    # Scatter no factor removes: half the calls predicted 10 % short, half 10 % long; the best
    # factor is 1 and leaves 10 %.
    k, p90 = best_scale([(0.9, 1.0), (1.1, 1.0), (0.45, 0.5), (0.55, 0.5)])
    assert k == pytest.approx(1.0, abs=0.01) and p90 == pytest.approx(0.10, abs=0.005)
    # A line (the calibration's form) removes an offset a factor cannot: actual = 0.05 + 1.1 x predicted.
    offset = [(p, 0.05 + 1.1 * p) for p in (0.1, 0.2, 0.4, 0.8, 1.6)]
    assert best_scale(offset)[1] > 0.05
    a, b, p90 = best_line(offset)
    assert a == pytest.approx(0.05, abs=0.005) and b == pytest.approx(1.1, abs=0.01) and p90 < 0.005
    main([f"x={log}", "--floor"])
    out = capsys.readouterr().out
    assert "| x | 4 | 20.0 % | x1.25" in out and out.rstrip().endswith("| – | – |")  # no prefill node's log beside
    # The prefill node's log beside it: ten calls whose engine time is a line in their uncached tokens
    # (a quadratic fits it exactly), and one all cached (not counted).
    lines = [f"2026-12-07 05:41:{10 + 2 * i:02d},456 INFO prefill tandem.prefill_node.server: request r{i}-p0.0: "
             f"prefilled {100 + 60 * i} tokens (32 cached) in {0.03 + 0.001 * (68 + 60 * i):.3f} s "
             f"({0.02 + 0.001 * (68 + 60 * i):.3f} s from its first step)\n" for i in range(10)]
    lines.append("2026-12-07 05:41:59,000 INFO prefill tandem.prefill_node.server: request c-p0.0: prefilled 64 "
                 "tokens (64 cached) in 0.011 s (0.010 s from its first step)\n")
    (tmp_path / "prefill-0.log").write_text("".join(lines))
    main([f"x={log}", "--floor"])
    assert capsys.readouterr().out.rstrip().endswith("| 0.0 % (n 10) | 0.0 % |")
    # The second half of the calls 15 % slower (tokens in a scrambled order): no fit in tokens removes
    # that, the previous call's deviation carried takes some of it off.
    from tandem.bench.metrics import percentile
    from tandem.bench.prefill_scatter import hindsight_errors, node_prefills

    samples = []
    for i in range(20):
        k = 64 + 40 * (i * 7 % 20)
        took = (0.02 + 0.001 * k) * (1.0 if i < 10 else 1.15)
        samples.append((k, round(took, 3), 2.0 * i))
    (tmp_path / "prefill-0.log").write_text("".join(
        f"2026-12-07 05:{41 + int(t + took) // 60:02d}:{int(t + took) % 60:02d},{round((t + took) % 1 * 1000):03d} "
        f"INFO prefill tandem.prefill_node.server: request s{i}-p0.0: prefilled {k} tokens (0 cached) in "
        f"{took + 0.005:.3f} s ({took:.3f} s from its first step)\n" for i, (k, took, t) in enumerate(samples)))
    parsed = sorted(node_prefills(tmp_path / "prefill-0.log").values(), key=lambda x: x[2])
    assert [(k, took) for k, took, _ in parsed] == [(k, took) for k, took, _ in samples]
    quad, paced = (percentile(e, 90) * 100 for e in hindsight_errors(parsed))
    assert 0 < paced < quad
    main([f"x={log}", "--floor"])
    assert capsys.readouterr().out.rstrip().endswith(f"| {quad:.1f} % (n 20) | {paced:.1f} % |")
