"""A node's pace now (tandem/nodespeed.py, Pace): measured on the node, sent in its load, and taken
by admission's TTFT predictions (coordinator/nodeclient.py) with --pace on."""

from __future__ import annotations

import math

import pytest

from tandem.coordinator.admission import Admission, Slo
from tandem.coordinator.nodeclient import PACE_GAIN, PACE_HOLD_S
from tandem.coordinator.router import Router
from tandem.node.perf import NodePerf, engine_prefill_s
from tandem.nodespeed import PACE_LONG_S, PACE_TAU_S, Pace
from tandem.proto import tandem_pb2 as pb

from tests.test_admission import cluster, fits, run
from tests.test_node_perf import Clock


def test_pace_reads_how_far_the_latest_work_strays_from_the_nodes_long_run_lean() -> None:
    pace = Pace()
    assert pace.read(0.0) is None  # no work yet
    t = 0.0
    while t < 300.0:  # five minutes 10 % slower than the fit: that is its lean, not its pace now
        t += 0.05
        pace.add(t, 0.11, 0.10)
    dev, weight, age = pace.read(t)
    assert dev == pytest.approx(0.0, abs=1e-9) and age == 0.0
    assert weight == pytest.approx(1.0 / (1.0 - math.exp(-0.05 / PACE_TAU_S)), rel=1e-6)
    start = t
    while t < start + 5.0:  # then 5 s at 1.32x: log(1.2) above the lean
        t += 0.05
        pace.add(t, 0.132, 0.10)
    dev, _, _ = pace.read(t)
    # dense work: the fast mean is all but the new ratio; the slow one moved 1 - e^(-5/60) of the way
    fast = 1.0 - math.exp(-5.0 / PACE_TAU_S)
    slow = 1.0 - math.exp(-5.0 / PACE_LONG_S)
    assert dev == pytest.approx(math.log(1.2) * (fast - slow), rel=0.03)
    # read later with no work meanwhile: the same deviation, older and lighter
    dev2, weight2, age2 = pace.read(t + 2.0)
    assert dev2 == dev and age2 == pytest.approx(2.0) and weight2 < 0.2 * weight
    pace.add(t, 0.0, 0.1)  # no time or no prediction is no sample
    pace.add(t, 0.1, 0.0)
    assert pace.read(t)[0] == dev


class _Stats:
    def __init__(self, scheduled: float, first_token: float) -> None:
        self.scheduled_ts, self.first_token_ts = scheduled, first_token


class _Out:
    def __init__(self, scheduled: float, first_token: float) -> None:
        self.metrics = _Stats(scheduled, first_token)


def test_the_engines_own_prefill_time_leaves_out_its_queue_and_is_absent_without_stats() -> None:
    assert engine_prefill_s(_Out(10.0, 10.25)) == pytest.approx(0.25)
    assert engine_prefill_s(_Out(0.0, 10.25)) is None  # never scheduled (no stats)
    assert engine_prefill_s(object()) is None  # a simulated engine's output


def _queued_prefills(own_steps: bool) -> NodePerf:
    """A prefill node that fits 0.1 s a 100-token prompt, where a prompt sent behind another one
    took 0.2 s in the engine (it waited 0.2 s before that: 0.4 s in all)."""
    clock = Clock()
    perf = NodePerf(clock, own_steps=own_steps)
    for _ in range(200):  # two minutes of prompts alone, each 0.1 s for 100 tokens: the fit, and the lean
        with perf.prefill(100) as run:
            clock.t += 0.1
            run.uncached_tokens = 100
        clock.t += 0.5
    with perf.prefill(100) as first:
        second_cm = perf.prefill(100)
        second = second_cm.__enter__()
        clock.t += 0.1
        first.uncached_tokens, first.engine_s = 100, 0.1
    clock.t += 0.3
    second.uncached_tokens, second.engine_s = 100, 0.2
    second_cm.__exit__(None, None, None)
    return perf


def test_with_prompts_in_steps_of_their_own_a_queued_prefill_times_the_pace_by_the_engines_clock() -> None:
    own = _queued_prefills(own_steps=True)
    shared = _queued_prefills(own_steps=False)
    # The fit learned neither queued prefill (they overlapped); with its own steps the second's
    # 0.2 s in the engine says the node ran at twice its fit just now.
    assert own.model.prefill.samples == shared.model.prefill.samples == 200
    dev_own = own.pace["prefill"].read(own._clock())[0]
    dev_shared = shared.pace["prefill"].read(shared._clock())[0]
    assert dev_own > 0.15 and dev_shared == pytest.approx(0.0, abs=0.01)
    paces = {f.name: f for f in own.load().paces}
    assert list(paces) == ["prefill"]  # nothing decoded here: no decode pace
    assert list(paces["prefill"].terms) == ["deviation", "weight", "age_s"]
    assert paces["prefill"].coefficients[0] == pytest.approx(dev_own)
    from prometheus_client import REGISTRY

    own._speeds_at = -math.inf  # (exported at most once a second)
    own._export(force=True)
    assert REGISTRY.get_sample_value("tandem_perf_pace", {"model": "prefill"}) == pytest.approx(dev_own)


def _paced_load(deviation: float, age_s: float, queue: list[int] | None = None) -> pb.NodeLoad:
    return pb.NodeLoad(prefill_queue=queue or [], fits=fits(),
                       paces=[pb.PerfFit(name="prefill", terms=["deviation", "weight", "age_s"],
                                         coefficients=[deviation, 5.0, age_s])])


def test_admission_scales_ttft_by_the_nodes_pace_and_not_tpot_and_not_with_pace_off() -> None:
    def go():
        slow = math.log(1.25)
        r = cluster({"p0": _paced_load(slow, 0.0), "d0": pb.NodeLoad(fits=fits())})
        plain = cluster({"p0": pb.NodeLoad(fits=fits()), "d0": pb.NodeLoad(fits=fits())})
        p0 = r._nodes["p0"]
        factor, dev, age = p0.pace()
        assert dev == slow and age < 0.5
        assert factor == pytest.approx(math.exp(PACE_GAIN * slow * math.exp(-age / PACE_HOLD_S)))
        paced = Admission(r, local=False).plan("r", 100, 16, Slo())
        base = Admission(plain, local=False).plan("r", 100, 16, Slo())
        assert paced.ttft_s == pytest.approx(base.ttft_s * factor, rel=1e-3) and factor > 1.1
        assert paced.tpot_s == pytest.approx(base.tpot_s)  # the decode node sent no pace; TPOT takes none
        assert paced.paced and paced.pace[1] == slow and paced.ttft_factor == pytest.approx(factor, rel=1e-3)
        assert p0.calibrated("tpot", 0.05) == 0.05  # a TPOT is not paced, even on a paced node
        # an old reading counts for less
        p0.saw_load(_paced_load(slow, 3 * PACE_HOLD_S))
        assert 1.0 < p0.pace()[0] < 1.0 + (factor - 1.0) * 0.1
        # --pace off: the reading is kept for the log, the prediction is the fit's
        off = Router("tiny", watch_loads=False, pace="off")
        for node_id, node in r._nodes.items():
            off.on_membership(node_id, node.record)
            off._nodes[node_id].saw_load(_paced_load(slow, 0.0) if node_id == "p0" else pb.NodeLoad(fits=fits()))
        unpaced = Admission(off, local=False).plan("r", 100, 16, Slo())
        assert unpaced.ttft_s == pytest.approx(base.ttft_s) and not unpaced.paced and unpaced.pace[1] == slow
    run(go)


def test_a_decode_nodes_local_prefill_is_not_paced() -> None:
    def go():
        slow = math.log(1.25)
        terms = ["deviation", "weight", "age_s"]
        decode_load = pb.NodeLoad(fits=fits(), paces=[pb.PerfFit(name="decode", terms=terms, coefficients=[0.5, 30.0, 0.0]),
                                                      pb.PerfFit(name="prefill", terms=terms, coefficients=[slow, 1.0, 2.0])])
        r = cluster({"d0": decode_load})  # no prefill pool: the decode node prefills
        d0 = r._nodes["d0"]
        # the prefills' reading, though the steps' is fresher; logged, not taken
        assert d0.pace()[1] == slow and not d0.paced
        plan = Admission(r).plan("r", 100, 16, Slo())
        assert plan.local and not plan.paced and plan.pace[1] == slow  # logged, not taken
        assert d0.calibrated("ttft_local", 0.2) == 0.2
    run(go)


def test_a_prefill_node_serving_streams_whole_is_paced_by_its_prefills_not_its_steps() -> None:
    def go():
        terms = ["deviation", "weight", "age_s"]
        load = pb.NodeLoad(fits=fits(), paces=[pb.PerfFit(name="decode", terms=terms, coefficients=[0.5, 30.0, 0.0]),
                                               pb.PerfFit(name="prefill", terms=terms, coefficients=[-0.1, 2.0, 0.0])])
        p0 = cluster({"p0": load})._nodes["p0"]
        factor, dev, _ = p0.pace()
        assert dev == -0.1 and factor < 1.0 and p0.paced
        assert p0.calibrated("ttft_local", 0.2) == pytest.approx(0.2 * factor)  # a prompt it serves whole
        # a node whose prefills were never timed: not paced, whatever its steps say
        p0.saw_load(pb.NodeLoad(fits=fits(), paces=[pb.PerfFit(name="decode", terms=terms,
                                                               coefficients=[0.5, 30.0, 0.0])]))
        assert p0.pace() == (1.0, 0.0, math.inf) and p0.calibrated("ttft", 0.2) == 0.2
        # a malformed reading is none: no NaN reaches a prediction
        for bad in ([math.nan, 1.0, 0.0], [0.1, 1.0, math.inf], [0.1, 1.0, -1.0], [0.1, 1.0]):
            p0.saw_load(pb.NodeLoad(fits=fits(), paces=[pb.PerfFit(name="prefill", terms=terms, coefficients=bad)]))
            assert p0.pace() == (1.0, 0.0, math.inf) and p0.calibrated("ttft", 0.2) == 0.2, bad
    run(go)


def test_pace_must_be_on_or_off() -> None:
    with pytest.raises(ValueError, match="--pace must be on or off"):
        Router("tiny", watch_loads=False, pace="sometimes")
