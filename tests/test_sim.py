"""The cluster simulator and `tandem plan` (no engines: synthetic profiles)."""

from __future__ import annotations

import json
import math
from pathlib import Path
import random
import statistics
from dataclasses import dataclass, replace

import pytest

from tandem.sim import simulate
from tandem.simconfig import SimConfig
from tandem.simresults import attainment
from tandem.timings import Timings


@dataclass
class Req:
    arrival_s: float
    input_len: int
    output_len: int


def poisson(rate: float, n: int, seed: int, input_len: int = 100, output_len: int = 1) -> list[Req]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Req(t, input_len, output_len))
    return out


def test_one_prefill_node_is_an_md1_queue() -> None:
    service, rate = 0.1, 5.0  # deterministic 100 ms prefills at rho = 0.5
    t = Timings((service, 0.0, 0.0), (0.01, 0.0, 0.0))
    cfg = SimConfig(1, 1, t, t, order="fifo")
    waits = [o.ttft_s - service for o in simulate(cfg, poisson(rate, 60000, seed=1))]
    rho = rate * service
    expected = rho * service / (2 * (1 - rho))  # Pollaczek-Khinchine for deterministic service
    assert statistics.fmean(waits) == pytest.approx(expected, rel=0.04)
    assert min(waits) > -1e-9  # nothing starts before it arrives


def test_decode_steps_batch_and_cost_by_batch_and_context() -> None:
    # a step costs 10 ms + 1 ms per request + 1 us per context token; prefills take 50 ms
    t = Timings((0.05, 0.0, 0.0), (0.010, 0.001, 1e-6))
    cfg = SimConfig(2, 1, t, t, order="fifo")
    one = simulate(cfg, [Req(0.0, 1000, 11)])[0]
    assert one.ttft_s == pytest.approx(0.05)
    # ten steps at batch 1 whose context grows 1001, 1002, ... 1010
    steps = [0.011 + 1e-6 * (1001 + k) for k in range(10)]
    assert one.tpot_s == pytest.approx(sum(steps) / 10)
    assert one.e2e_s == pytest.approx(0.05 + sum(steps))
    a, b = simulate(cfg, [Req(0.0, 1000, 11), Req(0.0, 1000, 11)])  # two prefill nodes: both at once
    assert a.prefill_node != b.prefill_node and a.ttft_s == b.ttft_s == pytest.approx(0.05)
    both = [0.012 + 1e-6 * 2 * (1001 + k) for k in range(10)]  # one batch of two
    assert a.tpot_s == b.tpot_s == pytest.approx(sum(both) / 10)


def test_slack_order_runs_what_can_still_make_its_deadline_first_and_fifo_does_not() -> None:
    # one prefill node, busy for 0.5 s; then a long prompt that can no longer make its 1 s
    # objective, then a short one that still can
    t = Timings((0.0, 0.001, 0.0), (0.01, 0.0, 0.0))
    reqs = [Req(0.0, 500, 1), Req(0.01, 2000, 1), Req(0.02, 100, 1)]
    fifo = simulate(SimConfig(1, 1, t, t, order="fifo"), reqs)
    slack = simulate(SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.0), reqs)
    assert fifo[1].ttft_s == pytest.approx(2.5 - 0.01) and fifo[2].ttft_s == pytest.approx(2.6 - 0.02)
    assert slack[2].ttft_s == pytest.approx(0.6 - 0.02) and slack[1].ttft_s == pytest.approx(2.6 - 0.01)
    assert attainment(slack, 1.0, 1.0) == pytest.approx(2 / 3) and attainment(fifo, 1.0, 1.0) == pytest.approx(1 / 3)


def test_kv_capacity_holds_requests_back_and_one_that_never_fits_ends_uncompleted() -> None:
    t = Timings((0.001, 0.0, 0.0), (0.01, 0.0, 0.0))
    cfg = SimConfig(1, 1, t, t, kv_capacity_tokens=300, order="fifo")
    a, b, c = simulate(cfg, [Req(0.0, 100, 101), Req(0.0, 100, 101), Req(0.0, 400, 5)])
    assert a.completed and b.completed and not c.completed and c.never_fits
    assert b.e2e_s > a.e2e_s + 0.9  # b waited for a's 100 steps: both do not fit at once
    assert attainment([a, b, c], 10.0, 1.0) == pytest.approx(2 / 3)


def test_transfer_time_is_added_before_decoding() -> None:
    t = Timings((0.05, 0.0, 0.0), (0.01, 0.0, 0.0), (0.002, 1e-9))
    cfg = SimConfig(1, 1, t, t, kv_bytes_per_token=1000, order="fifo")
    o = simulate(cfg, [Req(0.0, 1000, 2)])[0]
    assert o.e2e_s == pytest.approx(0.05 + 0.002 + 1e-9 * 1000 * 1000 + 0.01)


def test_plan_finds_the_known_best_ratio() -> None:
    from tandem.plan import plan

    # prefill-bound: ~0.3 s per prompt, decode steps nearly free -> most nodes should prefill
    heavy_prefill = Timings((0.05, 0.001, 0.0), (0.005, 0.0001, 0.0))
    doc = plan(heavy_prefill, heavy_prefill, 4, "chat", 2.0, 0.05, requests=400, seeds=1)
    assert doc["best"] == "3:1"
    by = {f"{r['prefill']}:{r['decode']}": r for r in doc["rows"]}
    assert by["3:1"]["goodput_rps"] > by["2:2"]["goodput_rps"] > by["1:3"]["goodput_rps"] > 0
    assert by["1:3"]["limited_by"] == "TTFT (prefill)"
    # decode-bound: cheap prefills, steps that grow fast with the batch -> most nodes should decode
    heavy_decode = Timings((0.005, 0.00001, 0.0), (0.01, 0.004, 0.0))
    doc = plan(heavy_decode, heavy_decode, 4, "chat", 2.0, 0.05, requests=400, seeds=1)
    assert doc["best"] == "1:3"
    assert {r["limited_by"] for r in doc["rows"]} == {"TPOT (decode)"}


def test_a_probe_lasts_long_enough_for_the_cluster_to_fill() -> None:
    from tandem.plan import probe_size, trace

    assert probe_size(2.0, 2000, 60) == 2000 and probe_size(2000.0, 2000, 60) == 120_000
    # Why: outputs of ~250 tokens at 40 ms steps keep a request ~10 s; 2,000 requests at 2,000
    # req/s arrive within a second, before the first one ends, and meet a TPOT objective that a
    # minute of the same rate misses (each decode node holds at most 64).
    t = Timings((0.02, 6e-5, 0.0), (0.03, 2e-4, 2e-7))
    cfg = SimConfig(45, 19, t, t, max_batch=64, order="fifo")
    short = attainment(simulate(cfg, trace("chat", 2000.0, 2000, 0, 4096)), 1.0, 0.1)
    full = attainment(simulate(cfg, trace("chat", 2000.0, probe_size(2000.0, 2000, 60), 0, 4096)), 1.0, 0.1)
    assert short > 0.5 > 0.1 > full


def test_a_probe_whose_last_arrivals_miss_does_not_meet_the_target() -> None:
    from tandem.plan import steady_attainment
    from tandem.simresults import Outcome

    # 90 % overall, but a backlog building: the middle third met 100 %, the last 70 %; one more
    # third that way is 40 %
    outs = [Outcome(arrival_s=float(i), ttft_s=0.1, completed=True) for i in range(90)]
    for o in outs[60:69]:
        o.ttft_s = 5.0  # late
    assert steady_attainment(outs, 1.0, 1.0) == pytest.approx(0.4)
    assert steady_attainment(outs[:60], 1.0, 1.0) == 1.0
    # the same misses spread evenly (no trend): the probe's own 90 %
    flat = [Outcome(arrival_s=float(i), ttft_s=5.0 if i % 10 == 0 else 0.1, completed=True) for i in range(90)]
    assert steady_attainment(flat, 1.0, 1.0) == pytest.approx(0.9)


def test_a_plan_of_many_nodes_searches_coarse_then_fine_around_the_best() -> None:
    from tandem.plan import plan

    t = Timings((0.05, 0.001, 0.0), (0.005, 0.0001, 0.0))
    doc = plan(t, t, 40, "chat", 2.0, 0.05, requests=100, seeds=1, min_duration_s=5, also=(6,))
    done = [r["prefill"] for r in doc["rows"]]
    assert doc["splits"] == 39 and doc["splits_evaluated"] == len(done) < 39 and doc["search_step"] == 3
    assert {1, 4, 7, 37, 39, 6} <= set(done)  # one in 3, the last, and the one asked for
    best = int(doc["best"].split(":")[0])
    assert {best - 1, best + 1} & set(range(1, 40)) <= set(done)  # its neighbours were evaluated


def test_profiles_load_from_a_node_cache_file_and_from_coefficients(tmp_path) -> None:
    from tandem.perfmodel import NodeModel

    m = NodeModel()
    for n in (100, 200, 400, 800):
        m.saw_prefill(n, 0.01 + 1e-4 * n)
    for b, ctx in ((1, 100), (4, 800), (8, 3000), (2, 50)):
        m.saw_decode_step(b, ctx, 0.005 + 0.001 * b + 1e-6 * ctx)
    cached = tmp_path / "profile-x.json"
    cached.write_text(json.dumps({"key": {}, "model": m.state()}))
    t = Timings.load(cached)
    assert t.prefill_s(500) == pytest.approx(0.06, rel=1e-3)
    assert t.step_s(4, 800) == pytest.approx(0.0098, rel=1e-3)
    assert t.transfer == (0.0, 0.0)  # no fetch seen: nothing invented
    plain = tmp_path / "gpu.json"
    plain.write_text(json.dumps({"prefill": [0.02, 1e-5, 0], "decode": [0.01, 1e-4, 1e-7], "transfer": [1e-4, 4e-11]}))
    assert Timings.load(plain).transfer_s(10**9) == pytest.approx(0.0401)
    for bad_doc in ({"prefill": [1]}, {"prefill": [1], "decode": [0.1, 0, 0]}, [1, 2],
                    {"prefill": [0.1, -1, 0], "decode": [0.1, 0, 0]}, {"model": {"prefill": {}}}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(bad_doc))
        with pytest.raises(ValueError, match="not a profile|coefficients >= 0"):
            Timings.load(bad)
    empty = tmp_path / "profile-empty.json"
    empty.write_text(json.dumps({"key": {}, "model": NodeModel().state()}))
    with pytest.raises(ValueError, match="no prefill or no decode"):
        Timings.load(empty)


def test_tandem_plan_command_writes_its_report(tmp_path, capsys) -> None:
    from tandem.cli import build_parser

    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"prefill": [0.05, 0.001, 0], "decode": [0.005, 0.0001, 0]}))
    args = build_parser().parse_args(["plan", "--profile", str(prof), "--nodes", "3", "--workload", "code",
                                      "--slo-ttft", "2", "--slo-tpot", "0.05", "--requests", "300", "--seeds", "1",
                                      "--out", str(tmp_path / "plan")])
    assert args.fn(args) == 0
    doc = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [f"{r['prefill']}:{r['decode']}" for r in doc["rows"]] == ["1:2", "2:1"] and doc["best"] == "2:1"
    md = (tmp_path / "plan" / "plan.md").read_text()
    assert "| 2:1 (best) |" in md and "transfers take no time" in md
    assert (tmp_path / "plan" / "plan.png").stat().st_size > 0
    assert "best: 2:1" in capsys.readouterr().out
    assert not doc["colocate"] and any(m.startswith("colocation") for m in doc["not_modelled"])
    # the coordinator's colocation, asked for: modelled
    args = build_parser().parse_args(["plan", "--profile", str(prof), "--nodes", "2", "--workload", "code",
                                      "--slo-ttft", "2", "--slo-tpot", "0.05", "--requests", "200", "--seeds", "1",
                                      "--admission", "on", "--colocate", "on", "--out", str(tmp_path / "colo")])
    assert args.fn(args) == 0
    doc = json.loads((tmp_path / "colo" / "plan.json").read_text())
    assert doc["colocate"] and not any(m.startswith("colocation") for m in doc["not_modelled"])
    # objectives no split can meet: said so, and the search stops instead of bisecting towards 0
    args = build_parser().parse_args(["plan", "--profile", str(prof), "--nodes", "2", "--workload", "code",
                                      "--slo-ttft", "0.01", "--slo-tpot", "0.05", "--requests", "200", "--seeds", "1",
                                      "--out", str(tmp_path / "none")])
    assert args.fn(args) == 0
    doc = json.loads((tmp_path / "none" / "plan.json").read_text())
    assert doc["best"] == "none" and doc["rows"][0]["stopped_by"] == "below the lowest rate"
    assert len(doc["rows"][0]["probes"]) <= 8 and doc["rows"][0]["limited_by"] == "TTFT (prefill)"
    assert "No split meets the objectives" in (tmp_path / "none" / "plan.md").read_text()
    args = build_parser().parse_args(["plan", "--profile", str(tmp_path / "missing.json"), "--slo-ttft", "1",
                                      "--slo-tpot", "0.1"])
    assert args.fn(args) == 2
    # KV flags that cannot work: a clear error, no plan
    for flags, said in ((["--store-disk"], "--store-disk needs --store-ram-tokens"),
                        (["--store-ram-tokens", "-5"], "--store-ram-tokens must be >= 0"),
                        (["--store-ram-tokens", "4096", "--prefix-cache", "off"], "needs --prefix-cache on")):
        args = build_parser().parse_args(["plan", "--profile", str(prof), "--slo-ttft", "1", "--slo-tpot", "0.1",
                                          "--out", str(tmp_path / "bad"), *flags])
        assert args.fn(args) == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_validation_reads_the_nodes_profiles_and_the_goodput_each_side_implies(tmp_path) -> None:
    from tandem.plan_validate import goodput, node_profile, rel_error

    log = tmp_path / "prefill-0.log"
    log.write_text("x INFO starting\n2026 INFO prefill node p: performance model from the cached profile "
                   "/c/profile-ab12.json\n")
    assert node_profile(log) == Path("/c/profile-ab12.json")
    log.write_text("2026 INFO decode node d: profiled in 3.1 s (14 prefill, 40 decode samples); cached in /c/p-1.json\n"
                   "2026 INFO decode node d: performance model from the cached profile /c/p-2.json\n")
    assert node_profile(log) == Path("/c/p-2.json")  # the last start's (logs are appended)
    log.write_text("profile off: the model starts empty\n")
    with pytest.raises(RuntimeError, match="no profile named"):
        node_profile(log)
    rows = [{"rate": 2.0, "m": 0.5}, {"rate": 0.5, "m": 1.0}, {"rate": 1.0, "m": 0.93}, {"rate": 3.0, "m": 0.95}]
    assert goodput(rows, "m") == 1.0  # the first miss ends it (3.0 meeting again is noise)
    assert rel_error(1.1, 1.0) == pytest.approx(0.1) and math.isnan(rel_error(1.0, 0.0))


def test_plan_parallel_ranks_per_node_parallel_settings_by_goodput_per_gpu(tmp_path) -> None:
    from tandem.plan import parse_parallel, plan_parallel

    # The same GPU time in both settings' profiles: nodes of 4 GPUs run twice as fast as nodes
    # of 2, so goodput per GPU about ties.
    slow = {"prefill": [0.02, 4e-4, 0], "decode": [0.01, 2e-3, 0]}
    fast = {"prefill": [0.01, 2e-4, 0], "decode": [0.005, 1e-3, 0]}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    settings = parse_parallel(f"tp2=2:{tmp_path / 'slow.json'},tp4=4:{tmp_path / 'fast.json'}:50000")
    assert settings == [("tp2", 2, str(tmp_path / "slow.json"), 0), ("tp4", 4, str(tmp_path / "fast.json"), 50000)]
    res = plan_parallel(settings, 16, "code", 1.0, 0.1, tmp_path / "out", requests=200, seeds=1, min_duration_s=30,
                        max_model_len=2048)
    rows = {r["setting"]: r for r in res["rows"]}
    assert rows["tp2"]["nodes"] == 8 and rows["tp4"]["nodes"] == 4
    assert rows["tp4"]["per_gpu_rps"] == pytest.approx(rows["tp2"]["per_gpu_rps"], rel=0.35)
    assert (tmp_path / "out" / "tp2" / "plan.md").exists() and "| tp" in (tmp_path / "out" / "parallel.md").read_text()
    for bad in ("tp2", "tp2=x:p.json", "=2:p.json", "tp2=0:p.json"):
        with pytest.raises(ValueError, match="--parallel"):
            parse_parallel(bad)


def test_admission_refuses_what_would_miss_so_the_admitted_meet_their_objectives() -> None:
    from tandem.plan import trace
    from tandem.simresults import summary

    t = Timings((0.02, 4e-4, 0.0), (0.01, 2e-3, 0.0))
    over = trace("code", 8.0, 1500, 0, 2048)  # one prefill node serves ~3 req/s of these
    plain = simulate(SimConfig(1, 1, t, t, order="fifo", slo_ttft_s=1.0), over)
    admitted = simulate(SimConfig(1, 1, t, t, order="fifo", slo_ttft_s=1.0, slo_tpot_s=0.06, admission=True), over)
    s_plain, s_adm = summary(plain, 1.0, 0.06), summary(admitted, 1.0, 0.06)
    assert s_plain["refused"] == 0 and s_plain["attainment"] < 0.1  # the queue grows: nearly all late
    assert 0.4 < s_adm["refused"] / len(over) < 0.8
    served = [o for o in admitted if not o.refused]
    assert sum(1 for o in served if o.ttft_s <= 1.0) / len(served) > 0.95
    assert s_adm["attainment"] > 5 * s_plain["attainment"]  # refused count as missed, and still far more met
    light = trace("code", 0.5, 400, 0, 2048)  # refused only when arrivals bunch up behind a prefill
    light_out = simulate(SimConfig(1, 1, t, t, order="fifo", slo_ttft_s=1.0, slo_tpot_s=0.06, admission=True), light)
    assert sum(o.refused for o in light_out) / len(light) < 0.05
    with pytest.raises(ValueError, match="admission needs both"):
        SimConfig(1, 1, t, t, order="fifo", admission=True)


def test_admission_checks_tpot_over_the_life_ahead_as_the_coordinator_forecasts_it() -> None:
    """Long streams arriving every 0.1 s: each newcomer's step with the batch now is within the
    objective (10 + 2 ms a stream, 30 ms: up to 9 streams), but over its 1,000 tokens the streams
    there stay and others keep arriving at the recent rate (``estimates.life_load``; the arrivals
    of the last 0.4 s counted over 5 s at least, ``Arrivals.least_s``: 0.8 a second for the fifth,
    each staying its 1,000 tokens), so from the fifth on the forecast is over it and they are
    refused."""
    t = Timings((0.001, 1e-6, 0.0), (0.010, 0.002, 0.0))
    reqs = [Req(0.1 * k, 16, 1000) for k in range(10)]
    out = simulate(SimConfig(1, 1, t, t, slo_ttft_s=1.0, slo_tpot_s=0.030, admission=True), reqs)
    assert [o.refused for o in out] == [False] * 4 + [True] * 6  # 4 streams: 10 + 2 x 5 = 20 ms now
    assert all(o.tpot_s <= 0.030 for o in out[:4])


def test_a_decode_pool_past_its_capacity_fails_a_probe_before_its_objectives_do() -> None:
    from tandem.plan import steady_attainment, trace

    # 30 decode slots of ~3 s requests serve ~10 req/s; at 11 req/s the wait for a slot grows for
    # as long as the probe runs (to ~30 s, ~0.12 s per token), while a 500 ms TPOT still holds.
    t = Timings((0.001, 0.0, 0.0), (0.012, 0.0, 0.0))
    cfg = SimConfig(2, 1, t, t, max_batch=30, order="fifo")

    def probe(rate: float) -> tuple[float, float]:
        out = simulate(cfg, trace("chat", rate, int(rate * 300), 0, 4096))
        return attainment(out, 5.0, 0.5), steady_attainment(out, 5.0, 0.5)

    over_plain, over_steady = probe(11.0)
    assert over_plain > 0.9 and over_steady == 0.0
    under_plain, under_steady = probe(8.0)
    assert under_plain == under_steady == 1.0


def test_local_prefills_on_the_decode_node_follow_admissions_rule_and_go_in_chunks() -> None:
    # prefill 1 ms per token on both kinds of node (a + b*n); steps 10 ms; 200-token prompts
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    base = dict(order="slack", slo_ttft_s=1.0, slo_tpot_s=0.1, step_tokens=64)
    # alone on an idle cluster: the prefill pool has no queue, so never locally
    alone = simulate(SimConfig(1, 1, t, t, local=True, **base), [Req(0.0, 200, 5)])[0]
    assert not alone.local and alone.prefill_node == 0 and alone.ttft_s == pytest.approx(0.2)
    # three at once: the second would wait 200 ms for the prefill node, so it prefills on the idle
    # decode node instead, in four chunks of at most 64 tokens inside four steps (the prompt's
    # 200 ms of compute spread over them; nothing decodes there yet, so no step time beside)
    outs = simulate(SimConfig(1, 1, t, t, local=True, **base), [Req(0.0, 200, 5) for _ in range(3)])
    assert [o.local for o in outs] == [False, True, False]
    assert outs[1].decode_node == 0 and outs[1].ttft_s == pytest.approx(0.2)
    assert all(o.completed for o in outs)
    off = simulate(SimConfig(1, 1, t, t, **base), [Req(0.0, 200, 5) for _ in range(3)])
    assert not any(o.local for o in off) and max(o.ttft_s for o in off) == pytest.approx(0.6)
    assert max(o.ttft_s for o in outs) < max(o.ttft_s for o in off)
    # a TPOT objective its prefill would push the decoding streams past: never locally
    tight = dict(base, slo_tpot_s=0.011)
    busy = [Req(0.0, 10, 200), Req(0.05, 200, 5), Req(0.05, 200, 5)]
    assert not any(o.local for o in simulate(SimConfig(1, 1, t, t, local=True, **tight), busy))


def test_with_no_prefill_pool_every_request_prefills_on_a_decode_node_and_a_plan_weighs_it() -> None:
    from tandem.plan import plan

    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    cfg = SimConfig(0, 1, t, t, local=True, order="slack", slo_ttft_s=1.0, slo_tpot_s=0.1, step_tokens=64)
    # one after the other on the one decode node: 200 ms of chunks each
    outs = simulate(cfg, [Req(0.0, 200, 5), Req(0.0, 200, 5)])
    assert all(o.local and o.completed and o.decode_node == 0 for o in outs)
    assert [o.ttft_s for o in outs] == [pytest.approx(0.2), pytest.approx(0.4)]
    with pytest.raises(ValueError, match="a prefill node unless"):
        SimConfig(0, 1, t, t, order="fifo")
    # decode-bound (cheap prefills, steps that grow fast with the batch): every node decoding wins
    heavy_decode = Timings((0.005, 0.00001, 0.0), (0.01, 0.004, 0.0))
    doc = plan(heavy_decode, heavy_decode, 4, "chat", 2.0, 0.05, requests=400, seeds=1, local=True)
    by = {f"{r['prefill']}:{r['decode']}": r for r in doc["rows"]}
    assert doc["best"] == "0:4" and by["0:4"]["goodput_rps"] > by["1:3"]["goodput_rps"] > 0
    assert doc["local"] and not any("conditional" in x for x in doc["not_modelled"])


def test_admission_with_local_prefills_refuses_what_no_option_meets_and_serves_the_rest() -> None:
    # Tandem as shipped: conditional disaggregation and admission together. Prefill 1 ms per token,
    # steps 10 ms, TTFT objective 0.5 s.
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    both = dict(order="slack", slo_ttft_s=0.5, slo_tpot_s=0.1, step_tokens=64, local=True, admission=True)
    # 0:2: a prompt of 800 tokens takes 0.8 s on any node, idle or not: refused at once; the short
    # ones around it are served, each on a decode node, the two nodes sharing them
    reqs = [Req(0.0, 200, 5), Req(0.01, 800, 5), Req(0.02, 200, 5), Req(0.03, 200, 5)]
    outs = simulate(SimConfig(0, 2, t, t, **both), reqs)
    assert [o.refused for o in outs] == [False, True, False, False]
    assert all(o.completed and o.local and o.ttft_s <= 0.5 for o in outs if not o.refused)
    assert {o.decode_node for o in outs if not o.refused} == {0, 1}
    # without admission the long one is served, late
    late = simulate(SimConfig(0, 2, t, t, **dict(both, admission=False)), reqs)[1]
    assert late.completed and not late.refused and late.ttft_s > 0.5
    # 1:1: the second of three at once goes to the idle decode node (the prefill node is busy),
    # the third would wait 0.4 s there and 0.2 s behind the local one, and meets its objective
    # either way: nothing refused
    three = simulate(SimConfig(1, 1, t, t, **both), [Req(0.0, 200, 5) for _ in range(3)])
    assert not any(o.refused for o in three) and [o.local for o in three] == [False, True, False]
    # with a 0.35 s objective the third and fourth meet it nowhere (0.4 s at least behind the
    # prefill node's first or the local one): refused, as the coordinator would
    tight = simulate(SimConfig(1, 1, t, t, **dict(both, slo_ttft_s=0.35)), [Req(0.0, 200, 5) for _ in range(4)])
    assert [o.refused for o in tight] == [False, False, True, True] and tight[1].local
    assert all(o.ttft_s <= 0.35 for o in tight if not o.refused)


def test_with_admission_running_streams_are_protected_by_what_each_has_left_of_its_objective() -> None:
    # One decode node, no prefill pool; steps 14 ms whatever the batch, prefill 1 ms a token, TPOT
    # objective 20 ms. A (100 tokens) runs from 10 ms, due by 1.99 s. B's 200-token prefill at 1 s
    # stalls it 0.2 s, within the slack A has built up (0.6 s): admitted, though spread over B's
    # own two tokens the stall would have looked like 100 ms a token. C's 600 tokens at 1.45 s
    # would stall A past its objective by the coordinator's rule (``pace.pushed``): refused.
    t = Timings((0.0, 0.001, 0.0), (0.014, 0.0, 0.0))
    reqs = [Req(0.0, 10, 100), Req(1.0, 200, 2), Req(1.45, 600, 2)]
    cfg = dict(order="slack", slo_ttft_s=1.0, slo_tpot_s=0.02, step_tokens=64, local=True)
    a, b, c = simulate(SimConfig(0, 1, t, t, admission=True, **cfg), reqs)
    assert a.completed and a.tpot_s <= 0.02
    assert b.completed and b.local and not b.refused
    assert c.refused
    # without admission nobody is refused (and C stalls A)
    served = simulate(SimConfig(0, 1, t, t, **cfg), reqs)
    assert not any(o.refused for o in served) and served[0].tpot_s > a.tpot_s


def test_plan_validate_reads_a_nodes_learned_fits_from_its_monitor_stream() -> None:
    import threading
    from concurrent import futures

    import grpc

    from tandem.plan_validate import learned_timings
    from tandem.proto import tandem_pb2 as pb
    from tandem.proto import tandem_pb2_grpc as pb_grpc

    class Monitor(pb_grpc.NodeMonitorServicer):
        def Watch(self, request, context):  # type: ignore[no-untyped-def]
            yield pb.NodeLoad(fits=[
                pb.PerfFit(name="prefill", terms=["const", "tokens", "tokens2"], coefficients=[0.01, 1e-4, 0.0], samples=9),
                pb.PerfFit(name="decode", terms=["const", "batch", "context"], coefficients=[0.02, 0.003, -1e-9],
                           samples=40),
                pb.PerfFit(name="transfer", terms=["const", "bytes"], coefficients=[0.0, 0.0], samples=0)])
            threading.Event().wait(5)  # a stream that stays open, as a node's does

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_NodeMonitorServicer_to_server(Monitor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        t = learned_timings(f"127.0.0.1:{port}", "decode-0, learned")
        assert t.prefill == (0.01, 1e-4, 0.0) and t.decode == (0.02, 0.003, 0.0, 0.0)  # a negative one counts as 0
        assert t.transfer == (0.0, 0.0) and t.step_s(10, 1000) == pytest.approx(0.05)
    finally:
        server.stop(0)


@dataclass
class Prompt:
    arrival_s: float
    input_len: int
    output_len: int
    input_ids: list[int]


def prompts(*spec: tuple[float, list[int]], output_len: int = 3) -> list[Prompt]:
    return [Prompt(t, len(ids), output_len, ids) for t, ids in spec]


def test_the_prefix_cache_finds_whole_blocks_from_the_start_and_drops_the_least_recently_used() -> None:
    from functools import partial

    from tandem.sim import PrefixCache
    from tandem.sim import block_keys as keys_of

    block_keys = partial(keys_of, block_tokens=16)
    a, b = list(range(100, 164)), list(range(200, 264))  # four 16-token blocks each
    cache = PrefixCache(capacity_tokens=8 * 16, block_tokens=16)
    cache.add(block_keys(a))
    assert cache.cached(block_keys(a + [1] * 20), 84) == 64  # a's four blocks; the tail's one whole block is not held
    assert cache.cached(block_keys(a), 64) == 48  # never the whole prompt: its last token is computed
    assert cache.cached(block_keys([7] + a), 65) == 0  # the same tokens after another: other keys
    assert cache.cached(block_keys(a[:16] + b[16:]), 64) == 16  # shared up to the first block's end only
    cache.add(block_keys(b))
    cache.cached(block_keys(a), 64, touch=True)  # a's first three blocks used since
    cache.add(block_keys(list(range(300, 332))))  # two blocks more than the eight it keeps
    assert len(cache) == 8
    # out first: the least recently used, and of one prompt its last block (as vLLM frees them),
    # so a's unused fourth block and b's fourth went, and both prompts' heads are still found
    longer = [1] * 16
    assert cache.cached(block_keys(a + longer), 80) == 48 and cache.cached(block_keys(b + longer), 80) == 48
    cache.add(block_keys(list(range(400, 464))))  # four more: b's three, the oldest now, and a's third
    assert cache.cached(block_keys(b), 64) == 0 and cache.cached(block_keys(a), 64) == 32
    # the simulator's engines keep the blocks a node's engines do
    from tandem.node.config import NodeConfig

    t = Timings((0.01, 0.0, 0.0), (0.01, 0.0, 0.0))
    assert SimConfig(1, 1, t, t, order="fifo").block_tokens == NodeConfig.__dataclass_fields__["block_size"].default


def test_the_simulator_computes_only_what_no_engine_holds_and_routes_to_the_holder() -> None:
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))  # 1 ms a computed prompt token
    a = list(range(100, 612))  # 512 tokens: 32 blocks
    cfg = SimConfig(1, 1, t, t, order="fifo", prefix_cache=True, block_tokens=16)
    first, again, longer = simulate(cfg, prompts((0.0, a), (10.0, a), (20.0, a + list(range(700, 764)))))
    assert first.ttft_s == pytest.approx(0.512)
    assert again.ttft_s == pytest.approx(0.016)  # 31 blocks held; the last block computed
    assert longer.ttft_s == pytest.approx(0.064)  # 32 held, its own 64 computed
    off = simulate(SimConfig(1, 1, t, t, order="fifo"), prompts((0.0, a), (10.0, a)))
    assert [o.ttft_s for o in off] == [pytest.approx(0.512)] * 2
    # a prefill engine too small for the prompt keeps what fits of its head
    small = simulate(SimConfig(1, 1, t, t, order="fifo", prefix_cache=True, block_tokens=16, prefill_cache_tokens=256),
                     prompts((0.0, a), (10.0, a)))
    assert small[1].ttft_s == pytest.approx(0.256)
    # two prefill nodes, both idle: the one holding the prefix takes it
    b = list(range(1000, 1512))
    outs = simulate(SimConfig(2, 1, t, t, order="fifo", prefix_cache=True, block_tokens=16),
                    prompts((0.0, a), (0.0, b), (10.0, b), (20.0, a)))
    assert [o.prefill_node for o in outs] == [0, 1, 1, 0]
    assert [o.ttft_s for o in outs[2:]] == [pytest.approx(0.016)] * 2


def test_a_decode_node_prefilling_locally_uses_what_its_engine_holds() -> None:
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    a = list(range(100, 612))
    cfg = SimConfig(0, 1, t, t, local=True, order="slack", slo_ttft_s=5.0, slo_tpot_s=1.0, step_tokens=512,
                    prefix_cache=True, block_tokens=16)
    first, again = simulate(cfg, prompts((0.0, a), (10.0, a)))
    assert first.local and again.local
    assert first.ttft_s == pytest.approx(0.512) and again.ttft_s == pytest.approx(0.016)
    # its KV cache mostly held by a running request (460 of 600 tokens reserved): 8 more blocks stay
    # cached beside the running one's own 3 prompt blocks (held by it): the prompt's first 8
    tight = simulate(SimConfig(0, 1, t, t, local=True, order="slack", slo_ttft_s=5.0, slo_tpot_s=1.0,
                               step_tokens=512, prefix_cache=True, block_tokens=16, kv_capacity_tokens=600),
                     [Prompt(0.0, 512, 3, a), Prompt(0.6, 60, 400, list(range(2000, 2060))),
                      Prompt(1.0, 512, 3, a)])
    assert tight[2].ttft_s == pytest.approx(0.512 - 0.128)


def test_a_local_prefill_queued_after_a_held_prefix_counts_its_attention_over_it() -> None:
    # prefill 1 ms a token plus attention, 1 µs per new token per token it attends to; no prefill pool
    t = Timings((0.0, 0.001, 1e-6), (0.010, 0.0, 0.0))
    a = list(range(100, 1108))  # 1,008 tokens: 63 whole blocks
    cfg = SimConfig(0, 2, t, t, local=True, order="slack", slo_ttft_s=60.0, slo_tpot_s=1.0, step_tokens=4096,
                    prefix_cache=True, block_tokens=16)
    outs = simulate(cfg, [Prompt(0.0, 1008, 1, a),  # warms decode node 0's cache with ``a``
                          Prompt(10.0, 1108, 1, a + list(range(5000, 5100))),  # 100 new after a: node 0
                          Prompt(10.0, 200, 1, list(range(6000, 6200))),  # 200 fresh: node 1, idle
                          Prompt(10.0, 50, 1, list(range(7000, 7050)))])
    assert [o.decode_node for o in outs[:3]] == [0, 0, 1]
    # Behind them: node 0's prefill is 100 tokens, but 0.1 + 1e-6 x 100 x (100 + 2,016) = 0.31 s;
    # node 1's 200 tokens take 0.2 + 1e-6 x 200 x 200 = 0.24 s. Counted by its tokens (0.11 s),
    # node 0's queue looked the shorter.
    assert outs[1].ttft_s == pytest.approx(0.3116, abs=1e-3) and outs[2].ttft_s == pytest.approx(0.24, abs=1e-3)
    assert outs[3].decode_node == 1


def test_a_nodes_kv_store_holds_chunks_its_engine_dropped_and_they_load_at_the_tiers_costs() -> None:
    from tandem.coordinator.prefix import LOAD_S_PER_TOKEN
    from tandem.sim import StoreTiers, block_keys

    # the tiers alone: RAM keeps one 256-token chunk, the rest goes to disk; a disk hit comes back
    store = StoreTiers(256, True, 256)
    a = list(range(100, 700))  # two whole chunks and a tail
    keys = block_keys(a, 256)
    store.save(keys)
    assert store.held(keys, 600) == (512, 256)  # the head in RAM, the second chunk on disk
    assert store.held(keys, 512) == (256, 0)  # never the whole prompt
    other = block_keys(list(range(2000, 2300)), 256)
    store.save(other)  # another prompt's chunk: a's head out to disk too
    assert store.held(keys, 600) == (512, 512)
    store.held(keys, 600, touch=True)  # loaded: a's chunks back into RAM (its head kept), the other's out
    assert store.held(keys, 600) == (512, 256) and store.held(other, 300) == (256, 256)
    assert StoreTiers(256, False, 256).held(keys, 600) == (0, 0)
    # in the cluster: an engine that keeps 64 tokens, a RAM tier over a disk tier
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    base = dict(order="fifo", prefix_cache=True, prefill_cache_tokens=64)
    trace = prompts((0.0, a), (10.0, a))
    bare = simulate(SimConfig(1, 1, t, t, **base), trace)
    assert bare[1].ttft_s == pytest.approx(0.536)  # the engine's two blocks only
    ram = simulate(SimConfig(1, 1, t, t, store_ram_tokens=4096, **base), trace)
    assert ram[1].ttft_s == pytest.approx(0.088 + (512 - 64) * LOAD_S_PER_TOKEN["ram"])
    disk = simulate(SimConfig(1, 1, t, t, store_ram_tokens=256, store_disk=True, **base), trace)
    assert disk[1].ttft_s == pytest.approx(0.088 + 192 * LOAD_S_PER_TOKEN["ram"] + 256 * LOAD_S_PER_TOKEN["disk"])
    gone = simulate(SimConfig(1, 1, t, t, store_ram_tokens=256, **base), trace)  # no disk: the second chunk is gone
    assert gone[1].ttft_s == pytest.approx(0.344 + (256 - 64) * LOAD_S_PER_TOKEN["ram"])
    # a node's learned load fit (k + r·t + s·u for t tokens loaded, u of them from disk) replaces the constants
    learned = Timings(t.prefill, t.decode, store_load=(0.02, 1e-5, 3e-5))
    ram = simulate(SimConfig(1, 1, learned, t, store_ram_tokens=4096, **base), trace)
    assert ram[1].ttft_s == pytest.approx(0.088 + 0.02 + 1e-5 * (512 - 64))
    disk = simulate(SimConfig(1, 1, learned, t, store_ram_tokens=256, store_disk=True, **base), trace)
    assert disk[1].ttft_s == pytest.approx(0.088 + 0.02 + 1e-5 * 448 + 3e-5 * 256)
    # and travels with a simulated node's model (what it reports: the coordinator predicts alike)
    assert Timings.of_model(learned.to_model()).store_load == pytest.approx((0.02, 1e-5, 3e-5), rel=1e-6)
    with pytest.raises(ValueError, match="RAM tier over a disk"):
        SimConfig(1, 1, t, t, store_disk=True, **base)


def test_validation_rows_say_what_the_simulator_would_have_said_without_the_caches(tmp_path, monkeypatch) -> None:
    # One rate of a multi-turn trace, the real cluster's run stubbed: each row carries the simulator's
    # prediction and, where they differ, its predictions without the KV store and without the prefix
    # caches; the report shows the KV memory both sides had and those predictions.
    import argparse

    from tandem.bench import compare
    from tandem.plan_validate import rate_rows, write_report

    measured = {"slo_attainment": 1.0, "ttft_s": {"p50": 0.05, "p90": 0.09}, "tpot_s": {"p50": 0.02, "p90": 0.03},
                "failed": 0}
    monkeypatch.setattr(compare, "_run", lambda target, entries, slo: measured)
    t = Timings((0.002, 4e-4, 5e-8), (0.008, 5e-4, 1e-6))
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.5, slo_tpot_s=0.1, prefix_cache=True,
                    prefill_cache_tokens=2048, kv_capacity_tokens=20000, store_ram_tokens=8192, store_disk=True)
    args = argparse.Namespace(slo_ttft=1.5, slo_tpot=0.1, workload="multi-turn", duration=60.0, max_model_len=2048,
                              prefixes=4)  # four conversations, long ones: more than the prefill engine holds
    row, = rate_rows("http://x", cfg, args, [2.0])
    assert row["measured"]["ttft_p50_s"] == 0.05
    with_all, no_store, none = (row[k]["ttft_p50_s"] for k in ("predicted", "predicted_without_kv_store",
                                                                "predicted_without_prefix_cache"))
    assert with_all < no_store < none  # each cache takes work off the prefill node
    doc = {"workload": "multi-turn", "slo": {"ttft_s": 1.5, "tpot_s": 0.1}, "duration_s": 40.0, "fits": "profile",
           "goal": "within 15 %", "rows": [row], "goodput": {"measured": 2.0, "predicted": 2.0},
           "transfer_modelled": True, "prefix_cache": True, "prefill_cache_tokens": 2048,
           "kv_capacity_tokens": 20000, "store_ram_tokens": 8192, "store_disk": True}
    write_report(tmp_path, doc)
    text = (tmp_path / "validate.md").read_text()
    assert "the prefill engine's cache 2,048 tokens, the decode engine's 20,000, a KV store on each node: RAM " \
           "8,192 tokens over a disk tier" in text
    assert "Without the KV store the simulator would have said" in text
    assert "Without the engines' prefix caches (and the KV store)" in text
    assert "(admission off, always disaggregated, colocation off)" in text
    assert "| served whole on a prefill node m / p |" in text
    # Tandem as shipped on the real side (`--admission on --conditional-disagg on --colocate on`): the
    # report says so, and colocation is no longer among what is not modelled
    write_report(tmp_path, {**doc, "admission": True, "conditional_disagg": True, "colocate": True})
    shipped = (tmp_path / "validate.md").read_text()
    assert ("(admission on, a request prefilled on the decode node where the coordinator chooses to, colocation on "
            "(as shipped))") in shipped
    assert "colocation" not in shipped.split("Not modelled:")[1].split("\n")[0]
    assert "colocation (every request decoded in the decode pool" in text.split("Not modelled:")[1]


def test_a_disaggregated_request_counts_on_its_decode_node_from_its_arrival() -> None:
    # As the coordinator books a decode node at admission: a second request arriving while the
    # first is still in the prefill pool sees it in the decode batch it would join.
    t = Timings((0.5, 0.0, 0.0), (0.01, 0.02, 0.0))  # prefill 0.5 s; a step 30 ms alone, 50 ms for two
    cfg = SimConfig(1, 1, t, t, order="fifo", slo_ttft_s=2.0, slo_tpot_s=0.04, admission=True)
    first, second = simulate(cfg, [Req(0.0, 100, 50), Req(0.01, 100, 50)])
    assert not first.refused and first.decode_node == 0 and first.completed
    assert second.refused  # two streams' step: over the TPOT objective
    later = simulate(cfg, [Req(0.0, 100, 50), Req(5.0, 100, 50)])[1]  # the first one is gone by then
    assert not later.refused and later.completed


def test_every_booking_ends_with_its_request() -> None:
    # single-token outputs, requests too large for a decode node's cache, refusals and ordinary ones:
    # once the trace has played out, no decode node holds a booking or counts a request
    from tandem.sim import _Cluster

    t = Timings((0.05, 1e-4, 0.0), (0.01, 0.002, 1e-6))
    reqs = [Req(0.05 * k, [300, 900, 100][k % 3], [1, 40, 200][k % 4 % 3] if k % 4 else 1) for k in range(300)]
    for admission in (False, True):
        cfg = SimConfig(1, 2, t, t, order="slack", slo_ttft_s=0.5, slo_tpot_s=0.02, admission=admission,
                        kv_capacity_tokens=1000)
        run = _Cluster(cfg, reqs)
        out = run.run()
        assert all(dn.assigned == 0 and not dn.booked and not dn.fetching for dn in run.decodes)
        assert all(o.decode_node == -1 for o, e in zip(out, reqs) if e.output_len <= 1 or o.never_fits or o.refused)
        assert any(o.completed and o.decode_node >= 0 for o in out)
        assert admission or any(o.never_fits for o in out)
        assert admission == any(o.refused for o in out)


def test_admission_calibrates_its_predictions_by_the_finished_requests_as_the_coordinator_does() -> None:
    """The decode node runs 1.5x slower than its fit says (a constant node speed, unseen by the
    predictions). Raw, admission fills its batch to what the fit allows and most streams go over
    TPOT; calibrated (the coordinator's ``Calibration``, learned from the requests finished so far),
    it learns the factor and, once it has, admits only what the node really serves in time."""
    from tandem.nodespeed import Speed
    from tandem.sim import _Cluster

    t = Timings((0.001, 1e-6, 0.0), (0.010, 0.002, 0.0))
    reqs = [Req(0.1 * k, 16, 20) for k in range(600)]
    cfg = SimConfig(1, 1, t, t, slo_ttft_s=1.0, slo_tpot_s=0.030, admission=True,
                    decode_speed=Speed(bias=math.log(1.5)))

    def late(out: list, start: int = 0) -> float:
        served = [o for o in out[start:] if o.completed]
        return sum(o.tpot_s > 0.030 for o in served) / len(served)

    raw = simulate(replace(cfg, calibrate=False), reqs)
    cluster = _Cluster(cfg, reqs)
    calibrated = cluster.run()
    assert late(raw) > 0.3
    assert late(calibrated, 300) < 0.05 and sum(not o.refused for o in calibrated[300:]) > 100
    learned = cluster.decodes[0].cal["tpot"]
    assert learned.samples > 100 and learned(0.020) == pytest.approx(0.030, rel=0.1)
    assert cluster.decodes[0].cal["ttft_local"].samples == 0 and cluster.pool_cal.samples > 100


def test_a_decode_nodes_recent_local_prefills_lengthen_the_step_its_predictions_use() -> None:
    """As a node reports ``prefill_busy`` and the coordinator's ``pace.stepper`` reads it: the
    share of the last 10 s a local prefill ran there makes the step the predictions use the
    harmonic mean of a plain step and one carrying a chunk; 10 s on, the plain step again."""
    from tandem.coordinator.pace import shared_step
    from tandem.sim import _Cluster

    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.0, slo_tpot_s=0.1, step_tokens=64, local=True)
    cluster = _Cluster(cfg, [Req(0.0, 200, 5) for _ in range(3)])
    out = cluster.run()
    dn = cluster.decodes[0]
    assert out[1].local and dn.busy_since is None and len(dn.busy) == 1
    start, end = dn.busy[0]
    assert start == 0.0 and end == pytest.approx(out[1].ttft_s)  # from its arrival to its first token
    share = (end - start) / 10.0
    step = cluster.stepper(dn, end)(4, 800)
    assert step == pytest.approx(shared_step(t, share, 64)(4, 800))
    assert t.step_s(4, 800) < step < t.prefill_s(64) + t.step_s(4, 800)
    assert cluster.stepper(dn, end + 10.5)(4, 800) == t.step_s(4, 800) and not dn.busy


def test_what_a_simulated_coordinator_learned_carries_into_the_next_trace() -> None:
    """As a real coordinator serving one rate after another keeps its calibrations: the next trace
    starts from them (a node 1.5x slower than its fit, learned on the first trace, is over-admitted
    less at the start of the second), and they are copies (a run leaves them as they were)."""
    from tandem.nodespeed import Speed
    from tandem.sim import _Cluster, simulate_draws

    t = Timings((0.001, 1e-6, 0.0), (0.010, 0.002, 0.0))
    reqs = [Req(0.1 * k, 16, 20) for k in range(300)]
    cfg = SimConfig(1, 1, t, t, slo_ttft_s=1.0, slo_tpot_s=0.030, admission=True,
                    decode_speed=Speed(bias=math.log(1.5)))
    first, learned = simulate_draws(cfg, reqs, 1.0, 0.030)  # (4 draws: the node's speed varies)
    assert len(learned) == 4 and learned[0].decode[0]["tpot"](0.020) == pytest.approx(0.030, rel=0.1)
    before = learned[0].decode[0]["tpot"].samples

    def late_early(cluster: _Cluster) -> int:  # TPOT misses among the first 100 requests
        return sum(o.completed and o.tpot_s > 0.030 for o in cluster.run()[:100])

    afresh, carried = _Cluster(cfg, reqs), _Cluster(cfg, reqs, learned[0])
    # (fewer, not none: the push check's steps are the fit's, which this node's bias is unseen by)
    assert late_early(carried) < late_early(afresh) / 2
    assert learned[0].decode[0]["tpot"].samples == before  # (the run learned on its own copy)
    again, after = simulate_draws(cfg, reqs, 1.0, 0.030, learned=learned)
    assert again["missed"]["tpot"] < first["missed"]["tpot"] and after[0].decode[0]["tpot"].samples > before


def test_each_request_teaches_the_calibration_of_where_it_ran_when_it_completes() -> None:
    """As ``coordinator/request.account`` does at a request's end: one prefilled in the pool teaches
    the pool's TTFT calibration, one prefilled on its decode node that node's local TTFT one, and
    every request with a TPOT its decode node's TPOT one; with each one's own raw prediction."""
    from tandem.sim import _Cluster

    t = Timings((0.0, 0.001, 0.0), (0.010, 0.0, 0.0))
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=1.0, slo_tpot_s=0.1, step_tokens=64, local=True,
                    admission=True)
    reqs = [Req(0.0, 200, 5) for _ in range(3)] + [Req(5.0, 200, 1)]  # (the last: one token, no TPOT)
    cluster = _Cluster(cfg, reqs)
    taught: list[tuple[str, float, float]] = []
    cluster.learn = lambda dn, kind, raw, actual: taught.append((kind, raw, actual))  # type: ignore[method-assign]
    out = cluster.run()
    assert [o.local for o in out] == [False, True, False, False] and all(o.completed for o in out)
    kinds = sorted(k for k, _, _ in taught)
    assert kinds == ["tpot"] * 3 + ["ttft"] * 3 + ["ttft_local"]
    local_ttft = next((raw, actual) for k, raw, actual in taught if k == "ttft_local")
    assert local_ttft[1] == pytest.approx(out[1].ttft_s) and local_ttft[0] == pytest.approx(0.2, rel=0.1)
    assert sorted(a for k, _, a in taught if k == "tpot") == pytest.approx(sorted(o.tpot_s for o in out[:3]))
    assert not cluster.raw  # (nothing left behind)


def test_colocation_serves_whole_on_a_prefill_node_what_the_decode_pool_would_refuse() -> None:
    # Prefill 1 ms a token; a step 10 ms + 2 ms a stream: at a 15 ms objective a node decodes two.
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.002, 0.0))
    base = dict(order="slack", slo_ttft_s=1.0, slo_tpot_s=0.015, admission=True)
    # Two long streams fill the decode node; a third at 0.5 s would step it at 16 ms; a one-token
    # request (no decode) follows it.
    reqs = [Req(0.0, 100, 200), Req(0.0, 100, 200), Req(0.5, 100, 50), Req(0.55, 100, 1)]
    off = simulate(SimConfig(1, 1, t, t, **base), reqs)
    on = simulate(SimConfig(1, 1, t, t, colocate=True, **base), reqs)
    assert off[2].refused and not on[2].refused
    assert [(o.ttft_s, o.tpot_s) for o in on[:2]] == [(o.ttft_s, o.tpot_s) for o in off[:2]]
    # The idle prefill node serves it whole: its prefill, then its own steps at 12 ms (a batch of
    # one), one of them carrying the next request's prefill (0.1 s and the batch's 2 ms beside).
    whole = on[2]
    assert whole.colocated and whole.local and whole.prefill_node == 0 and whole.decode_node == -1
    assert whole.ttft_s == pytest.approx(0.1)
    assert whole.tpot_s == pytest.approx((0.102 + 48 * 0.012) / 49) and whole.tpot_s <= 0.015
    # That prefill call waited for the prompt served whole ahead of it in the node's engine (until
    # 0.6 s), then ran beside its stream: 0.05 + 0.102 s.
    assert on[3].ttft_s == pytest.approx(0.152) and not on[3].colocated
    with pytest.raises(ValueError, match="colocation needs a prefill node and both objectives"):
        SimConfig(1, 1, t, t, order="fifo", colocate=True)


def test_a_prefill_call_that_would_push_a_stream_served_whole_past_its_objective_goes_elsewhere() -> None:
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.002, 0.0))
    base = dict(order="slack", slo_ttft_s=1.0, slo_tpot_s=0.015, admission=True, colocate=True)
    # As above, but a 150-token one-token request comes once the stream served whole is decoding
    # (its first token at 0.6 s, four more by 0.65 s): 45 tokens at 12 ms and a 0.15 s stall take
    # 0.69 s of the 0.685 s it has left; a 100-token one (0.64 s) would not.
    reqs = [Req(0.0, 100, 200), Req(0.0, 100, 200), Req(0.5, 100, 50), Req(0.65, 150, 1)]
    one = simulate(SimConfig(1, 1, t, t, **base), reqs)
    assert one[2].colocated and one[3].refused  # the only prefill node would push it
    assert not simulate(SimConfig(1, 1, t, t, **base), [*reqs[:3], Req(0.65, 100, 1)])[3].refused
    two = simulate(SimConfig(2, 1, t, t, **base), reqs)
    assert two[2].colocated and not two[3].refused
    assert two[3].prefill_node != two[2].prefill_node and two[3].ttft_s == pytest.approx(0.15)
    assert two[2].tpot_s == pytest.approx(0.012)  # nothing ran beside it


def test_a_prompt_served_whole_may_not_push_the_streams_that_node_serves_whole_past_their_objective() -> None:
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.002, 0.0))
    base = dict(order="slack", slo_ttft_s=1.0, slo_tpot_s=0.015, admission=True, colocate=True)
    whole = [Req(0.0, 100, 200), Req(0.0, 100, 200), Req(0.5, 100, 50)]  # the third served whole on p0
    # A fourth the full decode pool would miss for: on p0 its 150-token prefill (0.15 s) and the batch
    # of two (14 ms) would take the stream there 45 x 14 ms + 0.15 s = 0.78 s of the 0.685 s it has left.
    out = simulate(SimConfig(1, 1, t, t, **base), [*whole, Req(0.65, 150, 50)])
    assert out[2].colocated and out[3].refused
    # A 10-token prompt (0.64 s): served whole beside it, and both within the objective.
    out = simulate(SimConfig(1, 1, t, t, **base), [*whole, Req(0.65, 10, 50)])
    assert out[3].colocated and out[3].ttft_s == pytest.approx(0.022)
    assert max(o.tpot_s for o in out[2:]) <= 0.015


def test_the_prefill_pools_wait_counts_the_prompts_its_nodes_serve_whole() -> None:
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.002, 0.0))
    base = dict(order="slack", slo_ttft_s=1.0, slo_tpot_s=0.015, admission=True, colocate=True)
    # An 800-token prompt served whole on p0 from 0.5 s: a 300-token prefill call at 0.55 s waits
    # 0.75 s for it and takes 0.3 s, over its 1 s objective: refused. A 100-token one is in time.
    whole = [Req(0.0, 100, 200), Req(0.0, 100, 200), Req(0.5, 800, 50)]
    out = simulate(SimConfig(1, 1, t, t, **base), [*whole, Req(0.55, 300, 1)])
    assert out[2].colocated and out[3].refused
    out = simulate(SimConfig(1, 1, t, t, **base), [*whole, Req(0.55, 100, 1)])
    assert not out[3].refused and out[3].ttft_s == pytest.approx(0.85 + 0.002)  # (and beside its stream)


def test_a_prompt_served_whole_may_not_push_the_requests_waiting_for_the_pool_past_their_ttft() -> None:
    from tandem.sim import _Cluster

    # In a run: a 300-token call on p0 from 0.5 s to 0.8 s, a 100-token one waiting behind it (due
    # 0.4 s after its arrival at 0.55 s: it ends at 0.9 s), and at 0.56 s a request the full decode
    # pool would miss for. Served whole on p0 it starts before the waiting one (0.34 s: in time
    # itself) and makes it end at 1.0 s, late: refused. With a 0.5 s objective both are in time.
    t = Timings((0.0, 0.001, 0.0), (0.010, 0.002, 0.0))
    reqs = [Req(0.0, 100, 200), Req(0.0, 100, 200), Req(0.5, 300, 1), Req(0.55, 100, 1), Req(0.56, 100, 50)]
    for ttft_s, served in ((0.4, False), (0.5, True)):
        out = simulate(SimConfig(1, 1, t, t, order="slack", slo_ttft_s=ttft_s, slo_tpot_s=0.015, admission=True,
                                 colocate=True), reqs)
        assert out[4].colocated is served and out[4].refused is not served
        assert out[3].ttft_s <= ttft_s

    t = Timings((0.0, 0.001, 0.0), (0.010, 0.002, 0.0))
    reqs = [Req(0.0, 100, 2), Req(0.0, 100, 2), Req(0.0, 100, 2)]
    c = _Cluster(SimConfig(1, 1, t, t, order="slack", slo_ttft_s=0.35, slo_tpot_s=0.1, colocate=True), reqs)
    # The prefill node busy until 0.1 s; two requests waiting, 0.1 s each, due at 0.35 s: they end at
    # 0.2 and 0.3 s. A prompt served whole first (0.1 s) makes the second end at 0.4 s, late.
    c.busy_until[0] = 0.1
    for i in (0, 1):
        c.queue.append((0.35, i))
        c.queued_cost[i] = 0.1
    assert c.queue_pushed(0, 0.04, 0.0) == 0
    assert c.queue_pushed(0, 0.1, 0.0) == 1


def test_colocation_turns_the_decode_pools_refusals_into_requests_served_in_slo() -> None:
    from tandem.plan import trace
    from tandem.sim import simulate_summary

    # About this host's 1:1 cluster (0.33 ms a prompt token; 8.9 ms a step and 0.77 ms a stream) at
    # 3 req/s of chat, 1.5 x its goodput without colocation, at a TPOT-tight objective.
    t = Timings((0.02, 0.00033, 0.0), (0.0089, 0.00077, 0.0))
    tr = trace("chat", 3.0, 360, 0, 2048)
    cfg = SimConfig(1, 1, t, t, order="slack", slo_ttft_s=0.475, slo_tpot_s=0.0178, admission=True, local=True)
    off = simulate_summary(cfg, tr, 0.475, 0.0178)
    on = simulate_summary(replace(cfg, colocate=True), tr, 0.475, 0.0178)
    assert off["colocated_share"] == 0.0 and on["colocated_share"] > 0.1
    assert on["refused"] < off["refused"] and on["attainment"] > off["attainment"] + 0.05
    # what the prefill node's engine learned of its predictions carries into the next trace, as
    # the decode nodes' does
    from tandem.sim import simulate_draws

    _, learned = simulate_draws(replace(cfg, colocate=True), tr, 0.475, 0.0178)
    assert [h["tpot"].samples > 0 and h["ttft_local"].samples > 0 for h in learned[0].homes] == [True]
