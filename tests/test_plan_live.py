"""The live planner on synthetic measurements: the mix a coordinator's histograms give, the split
it recommends as the mix moves, one node at a time, and the check of its last prediction."""

from __future__ import annotations

import math
import random

import pytest

from tandem.mix import Mix, Scrape, parse
from tandem.plan_live import LivePlanner, Options, Pools, choose_move
from tandem.timings import Timings

BOUNDS = (16.0, 64.0, 256.0, 1024.0, math.inf)


def scrape(at: float, prompts: list[int], outputs: list[int], met: int, missed: int) -> Scrape:
    def hist(xs: list[int]) -> tuple[tuple[float, float], ...]:
        return tuple((le, float(sum(1 for x in xs if x <= le))) for le in BOUNDS)

    return Scrape(at, hist(prompts), hist(outputs), float(sum(prompts)), float(sum(outputs)), met, missed)


def test_a_window_between_two_reads_of_the_coordinators_histograms() -> None:
    text = "\n".join([
        "# TYPE tandem_request_prompt_tokens histogram",
        *[f'tandem_request_prompt_tokens_bucket{{le="{le}"}} {c}' for le, c in (("16.0", 0), ("64.0", 2), ("+Inf", 3))],
        "tandem_request_prompt_tokens_count 3", "tandem_request_prompt_tokens_sum 2100",
        "# TYPE tandem_request_generation_tokens histogram",
        *[f'tandem_request_generation_tokens_bucket{{le="{le}"}} {c}' for le, c in (("16.0", 1), ("64.0", 3), ("+Inf", 3))],
        "tandem_request_generation_tokens_count 3", "tandem_request_generation_tokens_sum 90",
        "# TYPE tandem_requests_slo counter",
        'tandem_requests_slo_total{met="yes"} 2', 'tandem_requests_slo_total{met="no"} 1', ""])
    b = parse(text, at=10.0)
    a = Scrape(0.0, ((16.0, 0.0), (64.0, 1.0), (math.inf, 1.0)), ((16.0, 0.0), (64.0, 1.0), (math.inf, 1.0)),
               50.0, 40.0, 1.0, 0.0)
    mix = Mix.between(a, b)
    assert mix.requests == 2 and mix.rate == pytest.approx(0.2)
    assert mix.prompt == ((16.0, 64.0, 1.0), (64.0, math.inf, 1.0))
    assert mix.output == ((0.0, 16.0, 1.0), (16.0, 64.0, 1.0))
    assert mix.mean_prompt == pytest.approx(1025) and mix.mean_output == pytest.approx(25)
    assert mix.attainment == pytest.approx(0.5)
    with pytest.raises(ValueError, match="restarted"):
        Mix.between(b, a)
    with pytest.raises(ValueError, match="histograms"):
        parse("# TYPE x counter\nx_total 1\n", at=0.0)


def test_a_restarted_coordinator_or_requests_without_objectives_are_told_apart() -> None:
    from dataclasses import replace

    a = scrape(0, [100] * 4, [10] * 4, 3, 1)
    b = scrape(30, [100] * 10, [10] * 10, 6, 4)
    assert Mix.between(a, b).attainment == pytest.approx(0.5)
    # a restart that happens to leave every count higher: its start time says so
    with pytest.raises(ValueError, match="restarted"):
        Mix.between(replace(a, started=1000.0), replace(b, started=2000.0))
    # requests with no objective count in the rate, not in the attainment; refused ones (judged,
    # never served) count in both
    c = replace(b, met=3.0, missed=1.0, unjudged=6.0)
    m = Mix.between(a, c)
    assert m.requests == 6 and m.served == 6 and math.isnan(m.attainment)
    d = replace(b, missed=9.0)  # 5 more refused: 11 ended, 6 served, 3 met
    m = Mix.between(a, d)
    assert m.requests == 11 and m.served == 6 and m.attainment == pytest.approx(3 / 11)
    with pytest.raises(ValueError, match="buckets"):
        Mix.between(a, replace(b, prompt=b.prompt[1:]))


def test_a_trace_drawn_from_a_window_keeps_its_lengths_and_rate() -> None:
    rng = random.Random(0)
    prompts = [rng.randint(300, 1000) for _ in range(200)]
    outputs = [rng.randint(20, 60) for _ in range(200)]
    mix = Mix.between(scrape(0, [], [], 0, 0), scrape(100, prompts, outputs, 200, 0))
    tr = mix.trace(rate=4.0, requests=2000, seed=1, max_model_len=4096)
    assert 1800 < len(tr) < 2200
    assert all(256 < e.input_len <= 1024 and 16 < e.output_len <= 64 for e in tr)
    assert tr[-1].arrival_s == pytest.approx(500, rel=0.1)


def test_choose_move_takes_the_least_busy_node_of_the_pool_with_too_many_and_never_empties_one() -> None:
    now = Pools(prefill=[("p0", 3), ("p1", 0), ("p2", 1)], decode=[("d0", 5)])
    assert choose_move((3, 1), (1, 3), now) == ("p1", "decode")
    assert choose_move((3, 1), (3, 1), now) is None
    assert choose_move((1, 1), (2, 0), Pools([("p0", 0)], [("d0", 0)])) is None


# Prefill costs 1 ms per prompt token; a decode step 2 ms + 4 ms per running request.
SLOW_PREFILL = Timings((0.01, 1e-3, 0.0), (0.002, 4e-3, 0.0))


def test_the_live_planner_follows_the_mix_one_node_at_a_time_after_confirming() -> None:
    opts = Options(slo_ttft_s=2.0, slo_tpot_s=0.05, window_s=100, min_gain=0.15, confirm=2, min_requests=20,
                   requests=300)
    lp = LivePlanner(SLOW_PREFILL, SLOW_PREFILL, opts)
    now = Pools(prefill=[("p0", 0)], decode=[("d0", 0), ("d1", 2), ("d2", 0)])
    # Long prompts, short outputs: prefill-bound, so 1:3 is the wrong way round.
    rng = random.Random(0)
    long_prompts = [rng.randint(800, 1000) for _ in range(150)]
    short_out = [rng.randint(4, 12) for _ in range(150)]
    lp.step(scrape(0, [], [], 0, 0), now)
    first = lp.step(scrape(50, long_prompts, short_out, 100, 50), now)
    assert first["best"] != "1:3" and first["goodput_rps"][first["best"]] > first["goodput_rps"]["1:3"]
    assert first["move"] is None and "1/2 windows" in first["action"]  # not yet confirmed
    second = lp.step(scrape(60, long_prompts + long_prompts[:10], short_out + short_out[:10], 105, 55), now)
    assert second["move"] == ["d0", "prefill"]  # one node, the least busy decode node
    # The previous window's prediction is checked against what the coordinator measured since.
    assert second["check"]["measured_attainment"] == pytest.approx(0.5)
    assert second["check"]["predicted_attainment"] == first["predicted_attainment"]


def test_the_live_planner_keeps_a_split_that_is_best_and_waits_for_enough_requests() -> None:
    lp = LivePlanner(SLOW_PREFILL, SLOW_PREFILL, Options(slo_ttft_s=2.0, slo_tpot_s=0.05, min_requests=20,
                                                         requests=300))
    now = Pools(prefill=[("p0", 0), ("p1", 0), ("p2", 0)], decode=[("d0", 0)])
    lp.step(scrape(0, [], [], 0, 0), now)
    few = lp.step(scrape(10, [900] * 5, [8] * 5, 5, 0), now)
    assert few["action"].startswith("waiting: 5 of 20")
    rng = random.Random(1)
    rec = lp.step(scrape(60, [rng.randint(800, 1000) for _ in range(150)], [rng.randint(4, 12) for _ in range(150)],
                         150, 0), now)
    assert rec["best"] == "3:1" and rec["move"] is None and rec["action"] == "keep 3:1"


def test_with_conditional_disaggregation_the_last_prefill_node_may_go_and_0_to_n_is_planned() -> None:
    # The decode nodes prefill when there is no prefill pool: 1:2 -> 0:3 empties the prefill pool.
    assert choose_move((1, 2), (0, 3), Pools([("p0", 0)], [("d0", 0), ("d1", 0)]), local=True) == ("p0", "decode")
    assert choose_move((1, 2), (0, 3), Pools([("p0", 0)], [("d0", 0), ("d1", 0)])) is None  # without: never
    assert choose_move((0, 1), (1, 0), Pools([], [("d0", 0)]), local=True) is None  # the last decode node stays
    # A 0:3 cluster is planned, not waited on: short prompts, long outputs (decode-bound).
    lp = LivePlanner(SLOW_PREFILL, SLOW_PREFILL, Options(slo_ttft_s=2.0, slo_tpot_s=0.2, min_requests=20,
                                                         requests=300, local=True))
    now = Pools(prefill=[], decode=[("d0", 0), ("d1", 0), ("d2", 0)])
    lp.step(scrape(0, [], [], 0, 0), now)
    rng = random.Random(2)
    rec = lp.step(scrape(60, [rng.randint(20, 40) for _ in range(100)], [rng.randint(100, 200) for _ in range(100)],
                         100, 0), now)
    assert not rec["action"].startswith("waiting") and "0:3" in rec["goodput_rps"]
    # Without conditional disaggregation a cluster with no prefill node is waited on.
    lp = LivePlanner(SLOW_PREFILL, SLOW_PREFILL, Options(slo_ttft_s=2.0, slo_tpot_s=0.2, min_requests=20, requests=300))
    lp.step(scrape(0, [], [], 0, 0), now)
    assert lp.step(scrape(60, [30] * 100, [150] * 100, 100, 0), now)["action"] == "waiting: a pool has no routable node"


def test_the_live_planner_models_admission_and_local_prefills_together_and_a_node_speed() -> None:
    """The coordinator's defaults (admission and conditional disaggregation both on) are what the
    live planner simulates, and with --node-speed its nodes stray from their profile as real ones
    do: a TPOT-tight mix is predicted to meet its objectives less often."""
    from tandem.nodespeed import Speed

    t = Timings((0.002, 4e-4, 5e-8), (0.008, 5e-4, 1e-6))
    now = Pools(prefill=[("p0", 0)], decode=[("d0", 0)])
    rng = random.Random(3)
    window = scrape(60, [rng.randint(200, 400) for _ in range(120)], [rng.randint(100, 200) for _ in range(120)],
                    120, 0)
    said = {}
    for name, speed in (("exact", Speed()), ("strays", Speed(0.2, 1.0, 0.1, 0.1))):
        lp = LivePlanner(t, t, Options(slo_ttft_s=1.0, slo_tpot_s=0.02, min_requests=20, requests=300,
                                       admission=True, local=True, speed=speed))
        lp.step(scrape(0, [], [], 0, 0), now)
        rec = lp.step(window, now)
        assert "0:2" in rec["goodput_rps"]  # (local prefills: a split without a prefill pool is weighed)
        said[name] = rec["predicted_attainment"]
    assert said["strays"] < said["exact"]


def test_fits_learned_are_each_pools_nodes_means_and_a_node_without_any_is_left_out() -> None:
    """--live --fits learned: before each decision, what the routable nodes have learned and how far
    their work strays (as the coordinator's status gives them), averaged by pool; a pool none of
    whose nodes has reported keeps the profiles'; with no prefill pool the decode nodes' prefill
    fits stand for it. The planner then predicts with them: decode nodes 3x slower than the
    profile predict worse."""
    from tandem.nodespeed import Speed
    from tandem.plan_live import Fits, learned_fits
    from tandem.proto import tandem_pb2 as pb

    prof = Timings((0.002, 4e-4, 5e-8), (0.008, 5e-4, 1e-6), source="profile")
    slow = Timings((0.004, 8e-4, 1e-7), (0.024, 1.5e-3, 3e-6), source="slow")
    fast = Timings((0.002, 4e-4, 5e-8), (0.012, 5e-4, 1e-6), source="fast")
    mid = Timings((0.003, 5e-4, 6e-8), (0.01, 6e-4, 1e-6), source="mid")
    told = {"p0": (mid, {"prefill": Speed(0.1, 1.0, 0.05, 0.02)}),
            "d0": (slow, {"decode": Speed(0.2, 2.0, 0.1, 0.04), "prefill": Speed(0.3)}),
            "d1": (fast, {})}
    profiles = Fits(prof, prof)
    f = learned_fits(Pools([("p0", 0)], [("d0", 0), ("d1", 0), ("d2", 0)], told), profiles)
    assert f.decode.decode == pytest.approx(tuple((a + b) / 2 for a, b in zip(slow.decode, fast.decode)))
    assert f.prefill == mid and f.prefill_speed == Speed.mean([Speed(0.1, 1.0, 0.05, 0.02)])
    assert f.decode_speed == Speed.mean([Speed(0.2, 2.0, 0.1, 0.04)])  # d1 measured none yet
    assert f.source == "learned by 3 node(s); none reported yet by d2"
    # no prefill pool: the decode nodes' prefill fits and speeds; no node has reported: the profiles
    zero = learned_fits(Pools([], [("d0", 0)], told), profiles)
    assert zero.prefill.prefill == pytest.approx(slow.prefill) and zero.prefill_speed.sd == pytest.approx(0.3)
    none = learned_fits(Pools([("p9", 0)], [("d9", 0)], told), profiles)
    assert (none.prefill, none.decode) == (prof, prof) and not none.decode_speed.varies
    # what the status carries becomes those times: negative noise as 0, a fit with no samples left out
    info = pb.NodeInfo(fits=[pb.PerfFit(name="prefill", coefficients=[0.01, 4e-4, 0.0], samples=9),
                             pb.PerfFit(name="decode", coefficients=[0.02, -1e-5, 3e-6], samples=40),
                             pb.PerfFit(name="transfer", coefficients=[0.001, 1e-9], samples=0)],
                       speeds=[pb.PerfFit(name="decode", coefficients=[0.2, 2.0, 0.1, 0.04])])
    t, sp = Timings.from_fits(info.fits, "d0, learned"), Speed.by_kind(info.speeds)
    assert t.decode == (0.02, 0.0, 3e-6, 0.0) and t.transfer == (0.0, 0.0) and sp == {"decode": Speed(0.2, 2.0, 0.1, 0.04)}

    rng = random.Random(4)
    window = scrape(60, [rng.randint(200, 400) for _ in range(120)], [rng.randint(100, 200) for _ in range(120)],
                    120, 0)
    pair = Pools([("p0", 0)], [("d0", 0)], told)
    said = {}
    for name in ("profiles", "learned"):
        lp = LivePlanner(prof, prof, Options(slo_ttft_s=1.0, slo_tpot_s=0.03, min_requests=20, requests=300))
        if name == "learned":
            lp.fits = learned_fits(pair, lp.fits)
        lp.step(scrape(0, [], [], 0, 0), pair)
        rec = lp.step(window, pair)
        assert rec["fits"] == lp.fits.source
        said[name] = rec["predicted_attainment"]
    assert said["learned"] < said["profiles"]


def test_learned_fits_are_refused_with_a_node_speed_or_without_live_nodes(tmp_path, capsys) -> None:
    from tandem.cli import build_parser

    base = ["plan", "--slo-ttft", "1", "--slo-tpot", "0.05", "--fits", "learned", "--out", str(tmp_path)]
    args = build_parser().parse_args([*base, "--live", "--node-speed", "0.1"])
    assert args.fn(args) == 2 and "--node-speed or --fits learned, not both" in capsys.readouterr().err
    args = build_parser().parse_args(base)
    assert args.fn(args) == 2 and "--fits learned is for --live or --validate" in capsys.readouterr().err


def test_the_pools_carry_what_each_routable_node_has_learned_as_the_status_gives_it() -> None:
    """`pools` reads the coordinator's status: a node that has sent no load message yet (no fits),
    one whose speed has another version's shape, and a draining one are not learned from."""
    from tandem.plan_live import pools
    from tandem.proto import tandem_pb2 as pb

    def fits(step: float) -> list[pb.PerfFit]:
        return [pb.PerfFit(name="prefill", coefficients=[0.01, 4e-4, 0.0], samples=5),
                pb.PerfFit(name="decode", coefficients=[step, 5e-4, 1e-6], samples=50)]

    status = pb.ClusterStatusResponse(nodes=[
        pb.NodeInfo(node_id="p0", role="prefill", outstanding=2, fits=fits(0.008)),
        pb.NodeInfo(node_id="d0", role="decode", fits=fits(0.02),
                    speeds=[pb.PerfFit(name="decode", coefficients=[0.2, 2.0, 0.1, 0.01])]),
        pb.NodeInfo(node_id="d1", role="decode"),  # no load message yet
        pb.NodeInfo(node_id="d2", role="decode", fits=fits(0.03), speeds=[pb.PerfFit(name="decode", coefficients=[1, 2, 3, 4, 5])]),
        pb.NodeInfo(node_id="d3", role="decode", draining=True, fits=fits(0.04))])

    class Client:
        def status(self, timeout_s: float) -> pb.ClusterStatusResponse:
            return status

    now = pools(Client())  # type: ignore[arg-type]
    assert now.prefill == [("p0", 2)] and [n for n, _ in now.decode] == ["d0", "d1", "d2"]
    assert sorted(now.learned) == ["d0", "p0"] and now.learned["d0"][0].decode == (0.02, 5e-4, 1e-6, 0.0)
    assert now.learned["d0"][1]["decode"].bias == 0.01
