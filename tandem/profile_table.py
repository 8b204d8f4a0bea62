"""A node profile fitted from a published table of GPU timings, for plans of hardware this host lacks.

The table's format is Splitwise's (Patel et al., ISCA 2024; its simulator's
``data/perf_model.csv``, github.com/Mutinifni/splitwise-sim, MIT licence): one
row per measured run of a model on one machine, with columns ``model``,
``hardware``, ``tensor_parallel``, ``prompt_size`` (tokens per prompt),
``batch_size``, ``token_size`` (output tokens), ``prompt_time`` (ms, the
prefill) and ``token_time`` (ms per output token, the mean over the decode).

The fit uses the forms the nodes fit online (tandem/perfmodel.py):

- prefill ``a + b·n + c·n²`` from the rows with one prompt (n = prompt_size):
  the simulator runs one prefill at a time;
- decode step ``d + e·B + f·L + j·(B − DECODE_KNEE)⁺`` from every row, B =
  batch_size and L the batch's mean context over the decode, B · (prompt_size
  + token_size / 2).

KV transfer times are not in the table: give them (``--transfer``) or the plan
says transfers take no time. ``fit_table`` reports each row's error against
the fit, so a reader sees where the forms do not hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from tandem.perfmodel import NodeModel
from tandem.timings import Timings


def rows_of(path: str | Path, model: str, hardware: str, tensor_parallel: int) -> list[dict[str, Any]]:
    """The table's rows for one configuration, repeated runs averaged (medians)."""
    runs: dict[tuple[int, int, int], list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (r["model"], r["hardware"], int(r["tensor_parallel"])) == (model, hardware, tensor_parallel):
                key = (int(r["prompt_size"]), int(r["batch_size"]), int(r["token_size"]))
                runs[key].append((float(r["prompt_time"]), float(r["token_time"])))
    if not runs:
        raise ValueError(f"{path}: no rows for model {model!r} on {hardware!r} with tensor_parallel {tensor_parallel}")
    return [{"prompt": p, "batch": b, "output": t, "prompt_ms": statistics.median(x[0] for x in v),
             "token_ms": statistics.median(x[1] for x in v), "runs": len(v)}
            for (p, b, t), v in sorted(runs.items())]


def fit_table(path: str | Path, model: str, hardware: str, tensor_parallel: int,
              transfer: tuple[float, float] = (0.0, 0.0)) -> tuple[Timings, dict[str, Any]]:
    """(the fitted Timings, a record of the fit: source, rows and each one's error)."""
    rows = rows_of(path, model, hardware, tensor_parallel)
    m = NodeModel()
    m.prefill.half_life = m.decode.half_life = 1e12  # a table, not a stream: no forgetting
    for r in rows:
        if r["batch"] == 1:
            m.saw_prefill(r["prompt"], r["prompt_ms"] / 1000)
        m.saw_decode_step(r["batch"], int(r["batch"] * (r["prompt"] + r["output"] / 2)), r["token_ms"] / 1000)
    if m.prefill.samples < 3 or m.decode.samples < 3:
        raise ValueError(f"{path}: too few rows to fit ({m.prefill.samples} prefills, {m.decode.samples} decodes)")
    fitted = Timings.of_model(m, source=f"{Path(path).name}: {model} on {hardware}, TP {tensor_parallel}")
    t = Timings(fitted.prefill, fitted.decode, transfer, fitted.source)
    checked = []
    for r in rows:
        step = t.step_s(r["batch"], int(r["batch"] * (r["prompt"] + r["output"] / 2))) * 1000
        row = {**r, "fit_token_ms": round(step, 2), "token_error": round(step / r["token_ms"] - 1, 3)}
        if r["batch"] == 1:
            pre = t.prefill_s(r["prompt"]) * 1000
            row.update({"fit_prompt_ms": round(pre, 2), "prompt_error": round(pre / r["prompt_ms"] - 1, 3)})
        checked.append(row)
    return t, {"table": str(path), "model": model, "hardware": hardware, "tensor_parallel": tensor_parallel,
               "timings": t.doc(), "rows": checked}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("table", help="a CSV in Splitwise's perf_model.csv format")
    ap.add_argument("--model", required=True, help="the table's model column, e.g. llama2-70b")
    ap.add_argument("--hardware", required=True, help="the table's hardware column, e.g. h100-80gb")
    ap.add_argument("--tensor-parallel", type=int, required=True)
    ap.add_argument("--transfer", default="0,0",
                    help="KV transfer seconds g,h (g + h·bytes): the table has none (default: free)")
    ap.add_argument("--out", required=True, help="the profile file to write (what `tandem plan --profile` reads)")


def cmd_fit(args: argparse.Namespace) -> int:
    try:
        g, h = (float(x) for x in args.transfer.split(","))
        t, rec = fit_table(args.table, args.model, args.hardware, args.tensor_parallel, (g, h))
    except (OSError, ValueError) as exc:
        print(f"tandem fit-profile: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps({"prefill": list(t.prefill), "decode": list(t.decode),
                                          "transfer": list(t.transfer), "fit": rec}, indent=1) + "\n")
    worst_p = max((abs(r["prompt_error"]) for r in rec["rows"] if "prompt_error" in r), default=0.0)
    worst_d = max(abs(r["token_error"]) for r in rec["rows"])
    print(f"prefill {t.prefill}, decode {t.decode}, transfer {t.transfer}; largest error against the table: "
          f"prefill {worst_p:.0%}, decode step {worst_d:.0%}; wrote {args.out}")
    return 0
