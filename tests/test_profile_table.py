"""A profile fitted from a published table (Splitwise's format) recovers the times the table holds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.profile_table import fit_table
from tandem.timings import Timings

COLUMNS = ["model", "hardware", "prompt_size", "batch_size", "token_size", "peak_power", "average_power",
           "prompt_time", "token_time", "e2e_time", "tensor_parallel"]
TRUE = Timings((0.02, 1e-4, 5e-9), (0.03, 2e-4, 1e-7))


def write_table(path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        settings = [(p, 1, 128) for p in (128, 512, 2048, 8192)] + [(512, b, 128) for b in (2, 8, 32, 64)] + \
                   [(512, 1, t) for t in (1024, 8192)]
        for p, b, t in settings:
            step = TRUE.step_s(b, int(b * (p + t / 2)))
            for run in range(3):  # repeated runs: the fit takes their median
                jitter = 1 + (run - 1) * 0.01
                w.writerow(["m70", "gpu", p, b, t, 0, 0, TRUE.prefill_s(p) * 1000 * jitter, step * 1000 * jitter, 0, 8])
        w.writerow(["m70", "gpu", 512, 1, 128, 0, 0, 9999, 9999, 0, 4])  # another setting: left out


def test_a_table_fit_recovers_the_times_it_was_made_from(tmp_path: Path) -> None:
    table = tmp_path / "perf.csv"
    write_table(table)
    t, rec = fit_table(table, "m70", "gpu", 8, transfer=(0.001, 2e-11))
    for n in (128, 1000, 4096, 8192):
        assert t.prefill_s(n) == pytest.approx(TRUE.prefill_s(n), rel=0.02)
    for b, ctx in ((1, 600), (16, 9000), (64, 40000)):
        assert t.step_s(b, ctx) == pytest.approx(TRUE.step_s(b, ctx), rel=0.02)
    assert t.transfer == (0.001, 2e-11)
    assert len(rec["rows"]) == 10 and all(abs(r["token_error"]) < 0.02 for r in rec["rows"])
    with pytest.raises(ValueError, match="no rows"):
        fit_table(table, "m70", "gpu", 2)


def test_fit_profile_writes_a_profile_plan_reads(tmp_path: Path) -> None:
    table = tmp_path / "perf.csv"
    write_table(table)
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "fit-profile", str(table), "--model", "m70",
                           "--hardware", "gpu", "--tensor-parallel", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "largest error against the table" in proc.stdout
    loaded = Timings.load(out)
    assert loaded.prefill_s(2048) == pytest.approx(TRUE.prefill_s(2048), rel=0.02)
    assert json.loads(out.read_text())["fit"]["tensor_parallel"] == 8
