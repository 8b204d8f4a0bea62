"""The online performance model on synthetic timings with known answers."""

from __future__ import annotations

import random

import pytest

from tandem.perfmodel import NodeModel, OnlineFit, prefill_fit


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_exact_quadratic_prefill_times_give_back_their_coefficients() -> None:
    m = NodeModel()
    a, b, c = 0.012, 2.5e-4, 3e-8
    for n in range(16, 2049, 37):
        m.saw_prefill(n, a + b * n + c * n * n)
    got = m.prefill.coefficients()
    for want, have in zip((a, b, c), got):
        assert rel(have, want) < 1e-6, got
    assert rel(m.prefill_s(700), a + b * 700 + c * 700 * 700) < 1e-6


def test_a_prefill_after_a_cached_prefix_is_its_new_tokens_attending_to_the_whole_prompt() -> None:
    from tandem.coordinator.prefix import prefill_after_load
    from tandem.perfmodel import ModelView

    m = NodeModel()
    a, b, c = 0.012, 2.5e-4, 3e-8
    rng = random.Random(1)
    for _ in range(200):  # fresh prompts and ones after a cached prefix, mixed
        n, h = rng.randrange(1, 2048), rng.choice((0, 0, rng.randrange(16, 4096)))
        m.saw_prefill(n, a + b * n + c * ((n + h) ** 2 - h * h), cached=h)
    for want, have in zip((a, b, c), m.prefill.coefficients()):
        assert rel(have, want) < 1e-6
    view = ModelView.of(m)
    for n, h in ((100, 0), (100, 1000), (7, 3000)):
        want = a + b * n + c * ((n + h) ** 2 - h * h)
        assert rel(m.prefill_s(n, h), want) < 1e-6 and rel(view.prefill_s(n, h), want) < 1e-6
        # the coordinator's credit for a prefix a node holds: the same prefill, of the whole prompt
        assert rel(prefill_after_load(view, n + h, h), want) < 1e-6
    assert m.prefill_s(100, 1000) > m.prefill_s(100)


def test_decode_steps_and_transfers_fit_their_linear_forms() -> None:
    m = NodeModel()
    rng = random.Random(0)
    for _ in range(300):
        batch, ctx = rng.randint(1, 64), rng.randint(100, 60_000)
        m.saw_decode_step(batch, ctx, 0.004 + 0.0003 * batch + 2e-7 * ctx)
        nbytes = rng.randint(1 << 16, 1 << 28)
        m.saw_transfer(nbytes, 0.0008 + nbytes / 7e9)
    d, e, f, k = m.decode.coefficients()
    assert rel(d, 0.004) < 1e-4 and rel(e, 0.0003) < 1e-4 and rel(f, 2e-7) < 1e-4 and k < 1e-9
    g, h = m.transfer.coefficients()
    assert rel(g, 0.0008) < 1e-4 and rel(h, 1 / 7e9) < 1e-4
    assert rel(m.step_s(33, 20_000), 0.004 + 0.0003 * 33 + 2e-7 * 20_000) < 1e-4


def test_a_decode_step_flat_over_small_batches_is_fitted_flat_there() -> None:
    """A step that small batches barely move (the weights' read) and larger ones add to, as a
    CPU's measured: the hinge past DECODE_KNEE lays it flat where a line could not."""
    from tandem.perfmodel import DECODE_KNEE, OnlineFit

    def truth(b: int, ctx: int) -> float:
        return 0.012 + 1e-4 * b + 1e-7 * ctx + 0.001 * max(0, b - DECODE_KNEE)

    m = NodeModel()
    line = OnlineFit(("const", "batch", "context"), (1.0, 10.0, 1e4))
    for b in (1, 2, 4, 8, 16, 32):  # the profile's batches (and a few of serving's)
        for n in (64, 384, 1024):
            m.saw_decode_step(b, b * n, truth(b, b * n))
            line.add((1.0, b, b * n), truth(b, b * n))
    for b in (1, 3, 5, 12, 30):
        assert rel(m.step_s(b, b * 300), truth(b, b * 300)) < 0.01
    # the line it replaces over-reads a batch of 5 (by 9 % here)
    assert line.predict((1.0, 5, 1500)) > 1.05 * truth(5, 1500)
    assert all(c >= 0 for c in m.decode.coefficients())
    # a node reporting the line only (three coefficients) still predicts with it
    from tandem.perfmodel import FitView, ModelView

    view = ModelView(decode=FitView(("const", "batch", "context"), (0.01, 0.001, 0.0), 9))
    assert view.step_s(8, 0) == pytest.approx(0.018)


def test_a_saved_decode_line_reads_as_that_line_and_another_form_is_refused() -> None:
    from tandem.perfmodel import OnlineFit

    m = NodeModel()
    m.saw_decode_step(2, 100, 0.01)
    assert NodeModel.from_state(m.state()).step_s(2, 100) == pytest.approx(m.step_s(2, 100))
    # a profile file from before the hinge: its decode fit a line, which it still predicts
    line = OnlineFit(("const", "batch", "context"), (1.0, 10.0, 1e4))
    for b in (1, 4, 8, 16, 32):
        for n in (64, 512):
            line.add((1.0, b, b * n), 0.01 + 0.001 * b + 1e-6 * b * n)
    st = {**m.state(), "decode": line.state()}
    old = NodeModel.from_state(st)
    assert old.decode.names[-1] == "batch_over_knee" and old.decode.coefficients()[-1] == 0.0
    for b in (1, 5, 20):
        assert old.step_s(b, b * 300) == pytest.approx(line.predict((1.0, b, b * 300)), rel=1e-6)
    old.saw_decode_step(6, 1800, 0.02)  # and it learns on in the new form
    bad = {**m.state(), "decode": OnlineFit(("const", "tokens"), (1.0, 1.0)).state()}
    with pytest.raises(ValueError, match="decode fit's terms"):
        NodeModel.from_state(bad)


def test_noisy_timings_predict_within_the_noise() -> None:
    rng = random.Random(1)
    m = NodeModel()
    true = lambda n: 0.02 + 3e-4 * n + 5e-8 * n * n  # noqa: E731
    for _ in range(400):
        n = rng.randint(16, 2048)
        m.saw_prefill(n, true(n) * rng.uniform(0.9, 1.1))
    for n in (64, 512, 2000):
        assert rel(m.prefill_s(n), true(n)) < 0.05


def test_coefficients_stay_non_negative() -> None:
    # Linear timings whose best unconstrained fit has a negative intercept and curvature.
    f = prefill_fit()
    for n in range(100, 2000, 50):
        f.add((1.0, n, n * n), 1e-4 * n - 0.003 - 1e-9 * n * n)
    coef = f.coefficients()
    assert all(c >= 0 for c in coef), coef
    assert f.predict((1.0, 0, 0)) >= 0


def test_the_fit_follows_a_node_that_slows_down() -> None:
    m = NodeModel()
    for i in range(600):
        n = 16 + (i * 97) % 2000
        m.saw_prefill(n, 0.01 + 2e-4 * n)
    for i in range(600):  # twice as slow from now on (a noisy neighbour, thermal throttling)
        n = 16 + (i * 89) % 2000
        m.saw_prefill(n, 2 * (0.01 + 2e-4 * n))
    # Three half-lives (200 samples each) on, the old era weighs 1/8 of the new one: 1/9 of all.
    old, new = 0.01 + 2e-4 * 1000, 2 * (0.01 + 2e-4 * 1000)
    assert rel(m.prefill_s(1000), old + 8 / 9 * (new - old)) < 0.002


def test_one_sample_or_none_predicts_something_finite_and_ready_needs_samples() -> None:
    m = NodeModel()
    assert m.prefill_s(100) == 0 and not m.ready()
    m.saw_prefill(100, 0.05)
    assert 0 <= m.prefill_s(100) <= 0.06
    for n in (200, 300):
        m.saw_prefill(n, 0.05 + 1e-4 * (n - 100))
    assert m.ready()


def test_bad_measurements_are_ignored_and_wrong_shapes_refused() -> None:
    f = prefill_fit()
    f.add((1.0, 10, 100), float("nan"))
    assert f.samples == 0
    with pytest.raises(ValueError):
        f.add((1.0, 10), 0.1)


def test_state_round_trip_predicts_the_same() -> None:
    m = NodeModel()
    for n in range(10, 1000, 10):
        m.saw_prefill(n, 0.01 + 1e-4 * n)
        m.saw_decode_step(n % 17 + 1, n * 30, 0.003 + 1e-4 * (n % 17 + 1))
    again = NodeModel.from_state(m.state())
    for n in (50, 500, 5000):
        assert again.prefill_s(n) == pytest.approx(m.prefill_s(n), rel=1e-12)
    assert again.step_s(8, 9000) == pytest.approx(m.step_s(8, 9000), rel=1e-12)
    assert OnlineFit.from_state(m.prefill.state()).samples == m.prefill.samples


def test_a_learned_load_cost_replaces_the_coordinators_constants_once_it_has_samples() -> None:
    from tandem.coordinator.prefix import load_s
    from tandem.perfmodel import LOAD_MIN_SAMPLES, LOAD_S_PER_TOKEN, ModelView

    m = NodeModel()
    ram, disk = LOAD_S_PER_TOKEN["ram"], LOAD_S_PER_TOKEN["disk"]
    # Its prior is the constants: before any load it predicts them.
    assert m.store_load_s(512, 256) == pytest.approx(256 * ram + 256 * disk, rel=1e-3)
    assert load_s(0, 0, ModelView.of(m)) == 0.0
    truth = lambda t, u: 0.012 + 2e-5 * t + 1e-4 * u  # noqa: E731
    for i in range(LOAD_MIN_SAMPLES):
        assert load_s(512, 256, ModelView.of(m)) == pytest.approx(256 * ram + 256 * disk)  # the constants
        m.saw_load(256 * (i + 1), 256 * (i % 2), truth(256 * (i + 1), 256 * (i % 2)))
    for i in range(200):
        t = 256 * (1 + i % 8)
        m.saw_load(t, 256 * (i % 3), truth(t, 256 * (i % 3)))
    view = ModelView.of(m)
    assert view.load.samples == LOAD_MIN_SAMPLES + 200
    assert load_s(512, 0, view) == pytest.approx(truth(512, 0), rel=0.02)
    assert load_s(512, 256, view) == pytest.approx(truth(512, 256), rel=0.02)
    assert load_s(0, 0, view) == 0.0  # nothing held: no step sat out either
    # Loads that all come from disk are learned; what they leave undetermined (RAM apart from disk)
    # the prior settles: a finite RAM-only cost, below the disk one.
    d = NodeModel()
    for i in range(200):
        t = 256 * (1 + i % 4)
        d.saw_load(t, t, t * 1e-4)
    assert d.store_load_s(512, 512) == pytest.approx(0.0512, rel=0.02)
    assert 0 <= d.store_load_s(512, 0) < d.store_load_s(512, 512)
    # The fit travels with the model's state; a state from before it had one starts from the prior.
    assert NodeModel.from_state(m.state()).store_load_s(512, 3) == pytest.approx(m.store_load_s(512, 3), rel=1e-9)
    old = m.state()
    del old["load"]
    assert NodeModel.from_state(old).load.samples == 0


def test_queue_time_is_the_prefills_ahead() -> None:
    m = NodeModel()
    for n in range(16, 2048, 64):
        m.saw_prefill(n, 0.01 + 1e-4 * n)
    assert m.queue_s([]) == 0
    assert m.queue_s([100, 1000]) == pytest.approx(m.prefill_s(100) + m.prefill_s(1000))


def test_a_held_prior_keeps_what_the_profile_set_apart_when_serving_moves_features_together() -> None:
    from tandem.perfmodel import decode_features, decode_fit

    def truth(b: int, ctx: int) -> float:
        return 0.010 + 0.002 * b + 1e-6 * ctx

    off_line = (2, 16000)  # long contexts in a small batch: a point serving never saw
    worst = {"held": 0.0, "alone": 0.0}
    for seed in range(5):
        rng = random.Random(seed)
        held, alone = decode_fit(), decode_fit()
        for b in (1, 4, 8, 16, 32):  # the profile: batches and contexts apart
            for n in (32, 256, 1024):
                held.add(decode_features(b, b * n), truth(b, b * n))
        held.hold_as_prior()
        # serving: every stream holds ~400 tokens (context moves with the batch), steps 5 % slower
        # than the profile said, and noisy
        for _ in range(3000):
            b = rng.randint(1, 40)
            ctx = int(b * rng.gauss(400, 20))
            y = truth(b, ctx) * 1.05 * (1 + rng.gauss(0, 0.1))
            held.add(decode_features(b, ctx), y)
            alone.add(decode_features(b, ctx), y)
        # along what serving saw, both learned it
        assert held.predict(decode_features(20, 8000)) == pytest.approx(truth(20, 8000) * 1.05, rel=0.05)
        for name, f in (("held", held), ("alone", alone)):
            worst[name] = max(worst[name], abs(f.predict(decode_features(*off_line)) / truth(2, 16000) - 1))
    # off it, the held prior still tells batch from context; serving alone splits them by its noise
    assert worst["held"] < 0.15 and worst["alone"] > 0.3, worst
    assert held.state()["weight"] > alone.state()["weight"]  # the prior is in its saved statistics


def test_holding_a_prior_twice_keeps_it() -> None:
    from tandem.perfmodel import decode_features, decode_fit

    f = decode_fit()
    for b in (1, 4, 16):
        for n in (64, 512):
            f.add(decode_features(b, b * n), 0.01 + 0.001 * b + 1e-6 * b * n)
    before = f.coefficients()
    f.hold_as_prior()
    f.hold_as_prior()  # nothing new since: the prior stays as it was
    assert f.coefficients() == pytest.approx(before, rel=1e-6, abs=1e-12)
