"""Benchmark math and workloads on synthetic data with known answers."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from tandem.bench.metrics import RequestTiming, percentile, summarize, ttft_breakdown
from tandem.bench.workloads import TraceEntry, arrivals, generate, load_trace, materialize, save_trace


def req(sent: float, first: float, step: float, n: int, ok: bool = True) -> RequestTiming:
    times = [first + i * step for i in range(n)]
    return RequestTiming(sent=sent, first_token=first, token_times=times, output_tokens=n, ok=ok)


def test_per_request_metrics() -> None:
    r = req(1.0, 1.5, 0.1, 11)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.1)
    assert r.e2e == pytest.approx(1.5)
    assert r.itls == pytest.approx([0.1] * 10)
    assert r.meets(0.6, 0.11) and not r.meets(0.4, None) and not r.meets(None, 0.05)
    assert req(0, 0.2, 0.1, 1).tpot is None  # one token: no TPOT, so only TTFT can fail it


def test_percentiles_match_numpy_linear() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert math.isnan(percentile([], 50))


def test_summary_attainment_and_goodput() -> None:
    reqs = [req(0, 0.2, 0.05, 10), req(1, 1.2, 0.05, 10),      # meet both
            req(2, 3.0, 0.05, 10),                              # TTFT 1.0: misses
            req(3, 3.2, 0.5, 10),                               # TPOT 0.5: misses
            RequestTiming(sent=4, ok=False, error="boom")]      # failed: misses everything
    s = summarize(reqs, duration_s=10.0, slo_ttft=0.5, slo_tpot=0.1)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["goodput_at_rate_rps"] == pytest.approx(0.2)
    assert s["throughput_rps"] == pytest.approx(0.4)
    assert s["output_tokens_per_s"] == pytest.approx(4.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)


def test_workloads_are_seeded_and_have_their_shapes() -> None:
    a = generate("chat", rate=20, duration_s=60, seed=3, max_model_len=4096)
    b = generate("chat", rate=20, duration_s=60, seed=3, max_model_len=4096)
    c = generate("chat", rate=20, duration_s=60, seed=4, max_model_len=4096)
    assert a == b and a != c
    assert 1000 < len(a) < 1400  # Poisson: about rate x duration
    ins = [e.input_len for e in a]
    outs = [e.output_len for e in a]
    assert 250 < statistics.median(ins) < 350 and max(ins) <= 2048
    assert 230 < statistics.mean(outs) < 270
    assert all(len(e.input_ids) == e.input_len for e in a)
    summ = generate("summarize", rate=5, duration_s=60, seed=0, max_model_len=1024)
    assert all(e.input_len + e.output_len < 1024 for e in summ)
    big = generate("summarize", rate=5, duration_s=60, seed=0, max_model_len=16384, with_ids=False)
    assert min(e.input_len for e in big) >= 2000 and max(e.input_len for e in big) <= 8000
    code = generate("code", rate=5, duration_s=60, seed=0, max_model_len=4096, with_ids=False)
    assert 700 < statistics.mean(e.input_len for e in code) < 900
    assert 20 < statistics.mean(e.output_len for e in code) < 40
    pre = generate("prefix-heavy", rate=5, duration_s=60, seed=0, max_model_len=4096)
    by_prefix: dict[int, list[list[int]]] = {}
    for e in pre:
        by_prefix.setdefault(e.prefix_id, []).append(e.input_ids[:1024])
    assert len(by_prefix) == 4 and all(all(p == ps[0] for p in ps) for ps in by_prefix.values())
    wide = generate("prefix-heavy", rate=5, duration_s=60, seed=0, max_model_len=4096, prefixes_n=12)
    assert len({e.prefix_id for e in wide}) == 12
    # Multi-turn: each turn of a conversation starts with the whole previous turn (prompt and a reply).
    turns = generate("multi-turn", rate=10, duration_s=60, seed=0, max_model_len=1024, prefixes_n=5)
    assert turns == generate("multi-turn", rate=10, duration_s=60, seed=0, max_model_len=1024, prefixes_n=5)
    last: dict[int, TraceEntry] = {}
    grew = 0
    for e in turns:
        assert e.input_len + e.output_len < 1024 and len(e.input_ids) == e.input_len
        prev = last.get(e.prefix_id)
        if prev is not None and e.input_len > prev.input_len:
            assert e.input_ids[:prev.input_len] == prev.input_ids  # the conversation so far, resent
            assert e.input_len >= prev.input_len + prev.output_len + 16  # its reply, then a new message
            grew += 1
        last[e.prefix_id] = e
    assert len(last) == 5 and grew > len(turns) // 2
    assert len({tuple(e.input_ids[:128]) for e in turns}) == 1  # one system prompt for all


def test_burst_arrivals_are_burstier_than_poisson() -> None:
    import random

    def cv(xs: list[float]) -> float:
        gaps = [b - a for a, b in zip(xs, xs[1:])]
        return statistics.pstdev(gaps) / statistics.mean(gaps)

    poisson = arrivals(random.Random(1), 10, 500)
    bursty = arrivals(random.Random(1), 10, 500, burstiness=0.2)
    assert 0.9 < cv(poisson) < 1.1
    assert cv(bursty) > 1.8
    assert 4000 < len(bursty) < 6000  # same mean rate


def test_trace_round_trip_and_mooncake(tmp_path: Path) -> None:
    entries = generate("code", rate=5, duration_s=10, seed=1, max_model_len=2048)
    save_trace(tmp_path / "t.jsonl", entries)
    assert load_trace(tmp_path / "t.jsonl") == entries
    moon = tmp_path / "mooncake.jsonl"
    moon.write_text("\n".join(json.dumps(d) for d in [
        {"timestamp": 1500, "input_length": 700, "output_length": 20, "hash_ids": [0, 1]},
        {"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [0, 2]},
    ]) + "\n")
    got = load_trace(moon)
    assert [(e.arrival_s, e.input_len, e.output_len) for e in got] == [(0.0, 600, 10), (1.5, 700, 20)]
    materialize(got, seed=0, vocab_size=600)
    assert [len(e.input_ids) for e in got] == [600, 700]
    assert got[0].input_ids[:512] == got[1].input_ids[:512]  # shared hash id 0: shared first block
    assert got[0].input_ids[512:600] != got[1].input_ids[512:600]
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_trace(tmp_path / "bad.jsonl")


def test_refused_requests_are_misses_and_predictions_are_scored() -> None:
    a = req(0, 0.5, 0.1, 11)
    a.predicted_ttft, a.predicted_tpot, a.local_prefill = 0.4, 0.1, True  # 20 % and 0 % off
    b = req(1, 1.2, 0.05, 11)
    b.predicted_ttft, b.local_prefill = 0.3, False  # 50 % off; no TPOT prediction
    refused = RequestTiming(sent=2, ok=False, rejected=True, error="HTTP 429")
    s = summarize([a, b, refused], 10.0, 1.0, 1.0)
    assert (s["completed"], s["rejected"], s["failed"]) == (2, 1, 0)
    assert s["slo_attainment"] == pytest.approx(2 / 3)  # the refused one missed
    assert s["local_prefill_share"] == 0.5
    err = s["prediction_error"]
    assert err["ttft"]["n"] == 2 and err["ttft"]["p50"] == pytest.approx(0.35)
    assert err["ttft"]["bias"] == pytest.approx((-0.2 + 0.5) / 2)  # one 20 % low, one 50 % high
    assert err["tpot"]["n"] == 1 and err["tpot"]["p50"] == pytest.approx(0.0, abs=1e-9)
    # Per node: TTFT by the node that prefilled, TPOT by the decode node; nodes unknown are left out.
    a.prefill_node, a.decode_node, b.prefill_node = "p0", "d0", "p1"
    by = summarize([a, b, refused], 10.0, 1.0, 1.0)["prediction_error_by_node"]
    assert by["ttft"]["p0"]["p50"] == pytest.approx(0.2) and by["ttft"]["p1"]["p50"] == pytest.approx(0.5)
    assert list(by["tpot"]) == ["d0"] and by["tpot"]["d0"]["n"] == 1


def test_the_tpot_error_while_arrivals_go_on_leaves_out_what_decodes_past_the_last_send() -> None:
    a = req(0, 0.5, 0.1, 11)  # decodes until 1.5 s
    a.predicted_tpot = 0.12  # 20 % high
    b = req(1, 1.2, 0.1, 31)  # decodes until 4.2 s, after the last send (3 s)
    b.predicted_tpot = 0.15  # 50 % high: the batch it was forecast shrank when the arrivals stopped
    c = req(3, 3.5, 0.1, 2)
    err = summarize([a, b, c], 10.0, 1.0, 1.0)["prediction_error"]
    assert err["tpot"]["n"] == 2 and err["tpot"]["p90"] == pytest.approx(0.47)
    assert err["tpot_arriving"]["n"] == 1 and err["tpot_arriving"]["p90"] == pytest.approx(0.2)
    assert summarize([], 10.0, 1.0, 1.0)["prediction_error"]["tpot_arriving"]["n"] == 0


def test_the_report_has_the_overload_table_and_errors_per_node(tmp_path: Path) -> None:
    from tandem.bench.compare import write_report

    def probe(rate: float, met: int, x: float | None = None) -> dict:
        # The ones that miss, miss their TPOT (2 s a token); every TTFT is 0.2 s, predicted 0.24.
        reqs = [req(i * 0.1, i * 0.1 + 0.2, 0.01 if i < met else 2.0, 5) for i in range(10)]
        for r in reqs:
            r.predicted_ttft, r.prefill_node, r.decode_node = 0.24, "p0", "d0"
        s = summarize(reqs, 10.0, 1.0, 1.0)
        s.update(client_cpu_share=0.1, ttft_values=[r.ttft for r in reqs], tpot_values=[r.tpot for r in reqs])
        row = {"rate": rate, "attainment_median": met / 10, "attainment_min": met / 10,
               "attainment_max": met / 10, "reps": [s], "in_slo_rps": s["goodput_at_rate_rps"]}
        if x is not None:
            row["x_goodput"] = x
        return row

    system = {"name": "tandem-1:1", "version": "t", "commands": [], "goodput_rps": 1.0,
              "sweep": [probe(1.0, 10)], "overload": [probe(2.0, 9, 2.0), probe(1.0, 10, 1.0)]}
    doc = {"machine": "m", "client": "c", "model": "x", "model_params_m": 1.0, "workload": "chat",
           "duration_s": 10, "reps": 1, "rates": [1.0], "systems": [system], "overload": [(1.0, 1.0), (2.0, 2.0)],
           "slo": {"ttft_s": 1.0, "tpot_s": 1.0, "how": "given"}}
    text = write_report(tmp_path, doc).read_text()
    # 9 of 10 in SLO over 10 s at 2x, against a peak of 10 in 10 s: 90 % held.
    assert "| tandem-1:1 | 1.00 | 0.90 | 90% |" in text
    assert "ttft p0 20% / 20%" in text and (tmp_path / "attainment_vs_rate.png").exists()
    assert (tmp_path / "in_slo_vs_rate.png").stat().st_size > 1000


def test_the_ttft_breakdown_adds_up_to_what_the_client_saw() -> None:
    r = req(0, 0.5, 0.1, 3)
    r.server = {"ttft_s": 0.45, "dispatch_s": 0.01, "prefill_call_s": 0.4, "prefill_s": 0.3}
    parts = ttft_breakdown([r, req(0, 0.5, 0.1, 3)])  # the second has no server timings: left out
    got = {k: v["p50"] for k, v in parts.items()}
    assert got == pytest.approx({"dispatch": 0.01, "call_overhead": 0.1, "prefill": 0.3, "relay": 0.04,
                                 "client": 0.05})
    assert sum(got.values()) == pytest.approx(r.ttft)


def test_slo_tiers_are_seeded_and_each_request_is_judged_by_its_own() -> None:
    from tandem.bench.workloads import assign_tiers

    a, b = (generate("chat", rate=5, duration_s=20, seed=1, with_ids=False) for _ in range(2))
    assign_tiers(a, [1.0, 4.0], seed=7)
    assign_tiers(b, [1.0, 4.0], seed=7)
    assert [e.ttft_scale for e in a] == [e.ttft_scale for e in b]
    assert {e.ttft_scale for e in a} == {1.0, 4.0}
    tight, relaxed = req(0, 0.5, 0.01, 3), req(0, 0.5, 0.01, 3)  # both 0.5 s to the first token
    tight.slo_ttft, relaxed.slo_ttft = 0.2, 0.8
    s = summarize([tight, relaxed], 10.0, 0.2, 1.0)
    assert s["slo_attainment"] == 0.5 and s["attainment_by_ttft_slo"] == {"200": 0.0, "800": 1.0}


def test_eviction_replay_counts_the_store_hits_of_each_policy() -> None:
    from tandem.bench.eviction_replay import policy_table, replay, working_set

    a = list(range(5, 5 + 64))  # four chunks of 16
    b = a[:32] + list(range(100, 132))  # shares a's first two
    assert working_set([a, b], 16) == 6
    room = replay([a, b, a], num_slots=6, chunk_tokens=16, policy="lru")
    assert (room["hit_chunks"], room["chunks"]) == (2 + 4, 12)  # b finds a's first two, a all four
    # Four slots: b's two new chunks evict two of a's: LRU and tail-first its last two (b has just used
    # its first two), FIFO its first two, so the last request finds nothing.
    tight = {p: replay([a, b, a], num_slots=4, chunk_tokens=16, policy=p)["hit_chunks"] for p in ("lru", "tail-first", "fifo")}
    assert tight == {"lru": 2 + 2, "tail-first": 2 + 2, "fifo": 2 + 0}
    rows = policy_table({"w": [a, b, a]}, 16, fractions=(0.5,))
    assert {r["policy"] for r in rows} == {"tail-first", "lru", "fifo"} and all(r["slots"] == 3 for r in rows)


def test_a_prefix_corpus_is_shared_by_traces_of_different_seeds() -> None:
    from tandem.bench.workloads import generate

    a = generate("prefix-heavy", rate=5, duration_s=10, seed=1, max_model_len=2048, prefixes_n=3, corpus_seed=7)
    b = generate("prefix-heavy", rate=5, duration_s=10, seed=2, max_model_len=2048, prefixes_n=3, corpus_seed=7)
    pa = {tuple(e.input_ids[:1024]) for e in a}
    assert pa == {tuple(e.input_ids[:1024]) for e in b} and len(pa) == 3  # the same three prefixes...
    assert [e.input_ids for e in a] != [e.input_ids for e in b]  # ...under different requests
    c = generate("prefix-heavy", rate=5, duration_s=10, seed=1, max_model_len=2048, prefixes_n=3)
    assert {tuple(e.input_ids[:1024]) for e in c} != pa  # without a corpus: the trace's own seed


def test_multi_turn_conversations_under_way_are_one_corpus_and_warmed_as_they_start() -> None:
    import hashlib

    from tandem.bench.workloads import generate, warm_entries

    plain = generate("multi-turn", rate=8, duration_s=30, seed=3, max_model_len=2048, prefixes_n=6)
    digest = hashlib.sha256(repr([(e.arrival_s, e.input_ids, e.output_len) for e in plain]).encode()).hexdigest()
    # without a corpus seed the trace is what it was before conversations could be under way
    assert digest[:16] == "f7656e42f912ed1b"
    a = generate("multi-turn", rate=8, duration_s=30, seed=1, max_model_len=2048, prefixes_n=6, corpus_seed=7)
    b = generate("multi-turn", rate=8, duration_s=30, seed=2, max_model_len=2048, prefixes_n=6, corpus_seed=7)
    warm = warm_entries("multi-turn", 6, 2048, 600, corpus_seed=7)
    starts = [e.input_ids[:-8] for e in warm]
    assert len(starts) == 6 and max(map(len, starts)) > 600  # some well under way ...
    assert all(s[:256] == starts[0][:256] for s in starts)  # ... after one system prompt
    assert all(len(s) <= 0.75 * 2048 for s in starts)
    for trace in (a, b):
        first: dict[int, list[int]] = {}
        for e in trace:
            first.setdefault(e.prefix_id, e.input_ids)
            assert e.input_len + e.output_len < 2048
        # each conversation's first turn in a probe resends what the warm-up sent, then a message
        assert all(ids[:len(starts[c])] == starts[c] and len(ids) >= len(starts[c]) + 16 for c, ids in first.items())
    assert [e.input_ids for e in a] != [e.input_ids for e in b]  # different turns on one corpus
    with pytest.raises(ValueError, match="no corpus"):
        warm_entries("chat", 4, 2048, 600, corpus_seed=7)
