"""The goodput search: on a pure step function, and on a synthetic server whose capacity is known."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.bench.goodput import find_goodput
from tandem.bench.run import measure_attainment


def test_bisection_converges_on_a_step() -> None:
    seen: list[tuple[float, int]] = []

    def measure(rate: float, seed: int) -> float:
        seen.append((rate, seed))
        return 1.0 if rate <= 3.7 else 0.5

    res = find_goodput(measure, start_rate=1.0, seeds=3, rel_tol=0.02)
    assert res.stopped_by == "converged"
    assert 3.6 <= res.goodput_rps <= 3.7 < res.bracket[1]
    assert {s for _, s in seen} == {0, 1, 2}
    assert "90%" in res.kind


def test_the_median_of_seeds_decides_and_budgets_stop_the_search() -> None:
    # one seed in three fails everywhere: the median still meets up to the step
    res = find_goodput(lambda r, s: 0.0 if s == 1 else (1.0 if r <= 8 else 0.0), start_rate=1, seeds=3)
    assert 7.2 <= res.goodput_rps <= 8
    capped = find_goodput(lambda r, s: 1.0, start_rate=1, seeds=1, max_probes=4)
    assert capped.stopped_by == "probe budget" and capped.goodput_rps == 8.0
    with pytest.raises(ValueError):
        find_goodput(lambda r, s: 1.0, target=1.5)


def test_goodput_on_a_synthetic_server_lands_under_its_capacity() -> None:
    capacity = 50.0
    server = subprocess.Popen([sys.executable, "-m", "tandem.bench.synthetic", "--capacity", str(capacity)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("SYNTHETIC_READY"), line
        url = line.split()[1]

        def measure(rate: float, seed: int) -> float:
            return measure_attainment(url, "synthetic", "code", rate, 2.0, seed, 2048, 600,
                                      slo_ttft=0.2, slo_tpot=0.05)

        res = find_goodput(measure, start_rate=10, seeds=1, rel_tol=0.1, budget_s=120)
        assert res.stopped_by == "converged"
        assert 0.5 * capacity <= res.goodput_rps <= 1.1 * capacity, res.probes
        assert res.probes[0].attainment == 1.0  # a fifth of capacity: everything meets
    finally:
        server.kill()
        server.wait()


def test_compare_sweep_stops_after_a_rate_where_nothing_met_the_slo() -> None:
    import argparse

    from tandem.bench.compare import goodput_from_sweep, sweep
    from tandem.bench.systems import System

    server = subprocess.Popen([sys.executable, "-m", "tandem.bench.synthetic", "--capacity", "20"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[1]
        system = System("synthetic", url, [], "synthetic", lambda: None)
        args = argparse.Namespace(workload="code", rates=[5.0, 10.0, 40.0], reps=1, seed=0, duration=2.0,
                                  max_model_len=2048, probe_all=False)
        # 50 ms of "prefill" per request: a 1 ms TTFT SLO is met by nobody, at any rate.
        rows = sweep(system, args, (0.001, 1.0))
        assert [r["rate"] for r in rows] == [5.0] and rows[0]["attainment_median"] == 0
        assert goodput_from_sweep(rows) == 0.0
        # Overload probes run whatever came before, and say their multiple.
        over = sweep(system, args, (0.001, 1.0), [(1.5, 7.5)], warm=False, swept=False)
        assert [(r["rate"], r["x_goodput"]) for r in over] == [(7.5, 1.5)] and over[0]["in_slo_rps"] == 0
        args.probe_all = True
        easy = sweep(system, args, (5.0, 1.0))  # everything meets: every rate is probed
        assert [r["rate"] for r in easy] == [5.0, 10.0, 40.0] and easy[0]["attainment_median"] == 1.0
    finally:
        server.kill()
        server.wait()


def test_nixl_as_shipped_and_fixed_differ_only_by_the_fixes() -> None:
    from tandem.bench.systems import nixl_servers

    shipped = nixl_servers("/m", [0, 1], 1024, fixed=False)
    fixed = nixl_servers("/m", [0, 1], 1024, fixed=True)
    assert [s[0] for s in shipped] == [s[0] for s in fixed] == ["producer", "consumer"]
    for (_, cmd, env, _), (_, fcmd, fenv, _), bind in zip(shipped, fixed, ("0", "1")):
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == fenv["VLLM_CPU_OMP_THREADS_BIND"] == bind
        assert "taskset" not in cmd and "PYTHONPATH" not in env and "UCX_TLS" not in env
        assert fcmd[:3] == ["taskset", "-c", bind] and fcmd[3:5] == cmd[:2]
        assert "nixl-fixes" in fenv["PYTHONPATH"] and fenv["UCX_TLS"]


def test_compare_reports_a_system_that_did_not_start_and_measures_the_rest(
        tiny_model, tmp_path, monkeypatch) -> None:
    import tandem.bench.compare as compare
    from tandem.bench.systems import System
    from tandem.cli import build_parser

    server = subprocess.Popen([sys.executable, "-m", "tandem.bench.synthetic", "--capacity", "20"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[1]
        stopped = []

        def refuse(*_a, **_k):
            raise RuntimeError("http://127.0.0.1:1 did not come up in 300 s\n--- last 1 lines of x.log:\nboom")

        monkeypatch.setattr(compare, "start_vllm_colocated", refuse)
        ratios = []
        monkeypatch.setattr(compare, "start_tandem", lambda *a, **k: ratios.append(a[1:3]) or System(
            "tandem-2:1", url, [["tandem", "up"]], "synthetic", lambda: stopped.append(1),
            facts=lambda: {"prefill_token_hit_rate": 0.25, "prefills_per_node": {"p0": 3, "p1": 1},
                           "engine_preemptions": 7}))
        args = build_parser().parse_args(
            ["bench", "compare", "--model", str(tiny_model), "--rates", "5", "--duration", "1", "--reps", "1",
             "--slo-ttft", "2", "--slo-tpot", "0.5", "--workload", "code", "--overload", "",
             "--systems", "vllm-colocated,tandem", "--ratios", "2:1", "--out", str(tmp_path),
             "--kv-cache-gib", "0.05", "--decode-kv-cache-gib", "0.3", "--kvstore-ram-gib", "0.1"])
        assert args.fn(args) == 1  # a system missing from the comparison is a failed run ...
    finally:
        server.kill()
        server.wait()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in doc["systems"]] == ["tandem-2:1"] and stopped == [1]  # ... the rest measured
    assert ratios == [(2, 1)]
    assert doc["systems"][0]["sweep"][0]["reps"][0]["completed"] > 0
    assert [f["name"] for f in doc["failed"]] == ["vllm-colocated"] and "boom" in doc["failed"][0]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "**vllm-colocated did not start**" in report and "boom" in report
    assert "| tandem-2:1 | " in report and "| 25.0% | – | 7 | p0: 3, p1: 1 |" in report  # its cache facts
    # the misses by cause: refused, then the served ones late by their first token or over TPOT
    row = doc["systems"][0]["sweep"][0]
    rep = row["reps"][0]
    assert set(rep["missed"]) == {"refused", "failed", "ttft", "tpot"} and rep["missed"]["refused"] == rep["rejected"]
    share = [f"{rep['missed'][k] / rep['requests']:.0%}" for k in ("ttft", "tpot")]
    assert "| served, first token late | served, over TPOT |" in report
    assert f"| tandem-2:1 | {row['rate']} | {rep['rejected'] / rep['requests']:.0%} (" in report
    assert f"%) | {share[0]} | {share[1]} | " in report
    # colocated vLLM is given all of 2:1's KV memory: 2 x 0.05 + 0.3 (engines) + 3 x 0.1 (RAM tiers)
    assert doc["memory"]["tandem_kv_gib"] == {"2:1": pytest.approx(0.7)}
    assert doc["memory"]["colocated_kv_gib"] == pytest.approx(0.7)
    assert "each decode engine's 0.3 GiB" in report and "colocated vLLM's one cache 0.7 GiB" in report


def test_colocated_vllm_gets_all_of_the_largest_tandem_clusters_kv_memory() -> None:
    from tandem.bench import systems

    mem = systems.Memory(0.1, 0.15, "", 0.4, ((1, 1), (2, 1)))
    assert mem.tandem_gib(1, 1) == pytest.approx(0.1 + 0.4 + 2 * 0.15)
    assert mem.colocated_gib == pytest.approx(2 * 0.1 + 0.4 + 3 * 0.15)
    assert systems.Memory(0.2, 0.0).colocated_gib == pytest.approx(0.4)  # no decode size: both engines 0.2
    old = systems.MEMORY
    systems.MEMORY = mem
    try:  # vLLM's own P/D sizes its engines like Tandem's
        sizes = [int(cmd[cmd.index("--kv-cache-memory-bytes") + 1])
                 for _, cmd, _, _ in systems.nixl_servers("/m", [0, 1], 1024, fixed=False)]
    finally:
        systems.MEMORY = old
    assert sizes == [int(0.1 * 2**30), int(0.4 * 2**30)]


def test_ratios_parse_and_a_bad_one_is_refused() -> None:
    from tandem.bench.compare import parse_ratios

    assert parse_ratios("2:1, 1:1, 0:2") == [(2, 1), (1, 1), (0, 2)]
    for bad in ("2-1", "1:0"):
        with pytest.raises(SystemExit, match="P:D"):
            parse_ratios(bad)


def test_the_coordinator_sits_beside_the_prefill_nodes_unless_its_flags_or_variant_say() -> None:
    from tandem.bench.systems import coordinator_argv

    plan = ["0", "1"]  # 1:1, prefill node's cores first
    assert coordinator_argv("", plan, 1, []) == ["--cores", "0"]
    assert coordinator_argv("-coordondecode", plan, 1, []) == ["--cores", "1"]
    assert coordinator_argv("-nopace", ["0-1", "2", "3"], 1, ["--cores", "3"]) == ["--pace", "off", "--cores", "3"]
    assert coordinator_argv("-coordondecode", ["0", "1", "2", "3"], 2, []) == ["--cores", "2"]
    assert coordinator_argv("", ["0", "1"], 0, []) == []  # 0:N: no prefill node, it floats


def test_tandem_flags_a_variant_sets_itself_are_refused_before_any_work() -> None:
    from tandem.cli import build_parser

    args = build_parser().parse_args(["bench", "compare", "--systems", "tandem,tandem-random",
                                      "--tandem-flags", "--routing least-loaded"])
    with pytest.raises(SystemExit, match="--routing, which tandem-random sets itself"):
        args.fn(args)
    args = build_parser().parse_args(["bench", "compare", "--systems", "tandem-coordondecode",
                                      "--tandem-flags=--cores=1"])  # a flag given as --flag=value too
    with pytest.raises(SystemExit, match="--cores, which tandem-coordondecode sets itself"):
        args.fn(args)
    args = build_parser().parse_args(["bench", "compare", "--workload", "chat", "--warm-prefixes"])
    with pytest.raises(SystemExit, match="--workload prefix-heavy"):
        args.fn(args)
    # 0:N with a variant (or --tandem-flags) that keeps the decode nodes from prefilling
    for flags in (["--systems", "tandem,tandem-disagg"], ["--systems", "tandem", "--tandem-flags=--conditional-disagg=off"]):
        args = build_parser().parse_args(["bench", "compare", "--ratios", "1:1,0:2", *flags])
        with pytest.raises(SystemExit, match="the decode nodes must prefill"):
            args.fn(args)


def test_colocated_vllms_cache_facts_are_its_prefix_cache_hits_since_it_started() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tandem.bench.systems import engine_cache_facts

    text = """# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 400.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 700.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 0.0
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
"""
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    # 100 computed and 100 from the cache when the server was up (`started`: what it counted before the run)
    facts = engine_cache_facts(samples, {"local_compute": 100.0, "local_cache_hit": 100.0})
    assert facts == {"prefill_prompt_tokens": 900, "prefill_cached_tokens": 600, "prefill_token_hit_rate": 0.6667,
                     "engine_preemptions": 3}
