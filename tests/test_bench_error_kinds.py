"""bench/error_kinds.py on finish lines written as the coordinator writes them, with known errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.bench.error_kinds import errors, main, table


def finish(rid: str, ttft: float, tpot_ms: float, where: str, p_ttft: float, p_tpot_ms: float) -> str:
    return (f"2026-12-06 22:09:34,214 INFO coordinator tandem.coordinator.request: request {rid}: length after "
            f"205 tokens (ttft {ttft:.3f} s, tpot {tpot_ms:.1f} ms, e2e 5.703 s, {where}, migrations 0, "
            f"dispatch 0.002 s, prefill call 0.301 s; predicted ttft {p_ttft:.3f} s, tpot {p_tpot_ms:.1f} ms, "
            f"learned factors x1.0000, x1.0000, of the ttft waiting 0.000 s)\n")


def test_errors_are_told_apart_by_where_the_prompt_ran(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "coordinator.log"
    log.write_text(
        "2026-12-06 22:09:33,000 INFO coordinator tandem.coordinator.admission: request b: admitted, served whole "
        "on prefill node prefill-0 ...\n"
        + finish("a", 0.500, 20.0, "prefill prefill-0, decode decode-0", 0.400, 25.0)  # call: 20 %, 25 %
        + finish("b", 0.200, 40.0, "prefill prefill-0 (local), decode prefill-0", 0.300, 30.0)  # whole: 50 %, 25 %
        + finish("c", 0.100, 10.0, "prefill decode-0 (local), decode decode-0", 0.110, 10.0)  # local: 10 %, 0
        + "2026-12-06 22:09:35,000 INFO coordinator tandem.coordinator.admission: request d: admitted ...\n")
    e = errors([str(log)])
    assert e[("ttft", "call")] == pytest.approx([0.2]) and e[("ttft", "whole")] == pytest.approx([0.5])
    assert e[("ttft", "local")] == pytest.approx([0.1])
    assert e[("tpot", "decode")] == pytest.approx([0.25, 0.0]) and e[("tpot", "whole")] == pytest.approx([0.25])
    assert "| TTFT, served whole (prefill node) | 1, 50 / 50 % |" in table({"x": e})
    png = tmp_path / "e.png"
    main([f"x={log}", f"y={log},{log}", "--png", str(png)])
    assert "| TTFT, prefill calls | 1, 20 / 20 % | 2, 20 / 20 % |" in capsys.readouterr().out
    assert png.stat().st_size > 0
