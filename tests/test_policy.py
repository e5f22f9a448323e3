"""The policy as pure logic: no disk, no JAX."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxckpt.policy import CheckpointPolicy, MetricError, Record, auto_interval, resolve_mode


@pytest.mark.parametrize("name,mode", [
    ("val_loss", "min"), ("loss", "min"), ("val_acc", "max"), ("accuracy", "max"),
    ("val_auc", "max"), ("eval/f1", "max"), ("top5_accuracy", "max"), ("val_mse", "min"),
    ("val_iou", "max"), ("precision", "max"), ("recall", "max"), ("perplexity", "min"),
])
def test_auto_mode(name, mode):
    assert resolve_mode(name, "auto") == mode


@pytest.mark.parametrize("kwargs,match", [
    (dict(monitor="val_loss", mode="lowest"), "mode must be"),
    (dict(keep_latest=-1), "keep_latest"),
    (dict(monitor="val_loss", keep_best=-2), "keep_best"),
    (dict(monitor="val_loss", keep_best=0, keep_latest=0), "keep nothing"),
    (dict(keep_best=2), "needs a metric"),
    (dict(every_n_steps=0), "every_n_steps"),
    (dict(every_n_epochs=1.5), "every_n_epochs"),
    (dict(every_seconds=-1), "every_seconds"),
    (dict(monitor="val_loss", min_delta=-0.1), "min_delta"),
    (dict(every="often"), "every must be"),
    (dict(every="auto", overhead_budget=0), "overhead_budget"),
    (dict(mtbf_hours=3), "only applies"),
    (dict(every=5, every_n_steps=3), "disagree"),
])
def test_invalid_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointPolicy(**kwargs)


def test_keep_best_defaults_follow_monitor():
    assert CheckpointPolicy().keep_best == 0
    assert CheckpointPolicy(monitor="val_loss").keep_best == 1
    assert CheckpointPolicy(every=7).every_n_steps == 7


def test_missing_metric_names_wanted_and_given():
    policy = CheckpointPolicy(monitor="val_loss")
    with pytest.raises(MetricError) as err:
        policy.monitored_value({"loss": 1.0, "val_acc": 0.5})
    msg = str(err.value)
    assert "'val_loss'" in msg and "['loss', 'val_acc']" in msg


def test_min_delta_and_direction():
    low = CheckpointPolicy(monitor="val_loss", min_delta=0.1)
    assert low.is_better(0.5, 0.7) and not low.is_better(0.65, 0.7)
    high = CheckpointPolicy(monitor="val_acc", mode="max")
    assert high.is_better(0.9, 0.8) and not high.is_better(0.8, 0.9)


def test_due_rules_and_injected_clock():
    p = CheckpointPolicy(every_n_steps=10, every_seconds=60)
    assert p.is_due(20, now=0.0, last_save_time=0.0)
    assert not p.is_due(21, now=59.0, last_save_time=0.0)
    assert p.is_due(21, now=61.0, last_save_time=0.0)
    e = CheckpointPolicy(every_n_epochs=5)
    assert e.is_due(100, epoch=5) and not e.is_due(100, epoch=4) and not e.is_due(100)
    assert CheckpointPolicy().is_due(3)


def test_keep_latest_zero_writes_only_improvements():
    p = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=0)
    recs = [Record(1, 0.5)]
    assert p.should_save(0.6, recs, due=True) is None
    assert p.should_save(0.4, recs, due=True) == "best"
    assert p.should_save(float("nan"), recs, due=True) is None


def test_not_due_but_new_best_is_written():
    p = CheckpointPolicy(monitor="val_loss", every_n_epochs=10)
    assert p.should_save(0.1, [Record(1, 0.5)], due=False) == "best"
    assert p.should_save(0.9, [Record(1, 0.5)], due=False) is None


def test_tutorial_run_keeps_best_45_and_latest_50():
    losses = tutorial_losses()
    p = CheckpointPolicy(monitor="val_loss", mode="min")
    records = []
    for epoch, loss in enumerate(losses, start=1):
        if p.should_save(loss, records, due=True):
            records.append(Record(epoch, loss))
            kept = p.kept(records)
            records = [r for r in records if r.step in kept]
    assert p.kept(records) == {45: ["best #1"], 50: ["latest"]}


def tutorial_losses():
    """50 epochs: best val_loss 0.61 at epoch 45, epoch 50 ends at 0.629."""
    losses = [1.2 - 0.0125 * e for e in range(1, 45)]  # 1.1875 .. 0.65
    return losses + [0.61, 0.615, 0.62, 0.625, 0.627, 0.629]


metric = st.one_of(st.floats(-10, 10, allow_nan=False), st.just(float("nan")),
                   st.just(float("inf")), st.none())


@settings(max_examples=300, deadline=None)
@given(values=st.lists(metric, max_size=40), keep_best=st.integers(0, 4),
       keep_latest=st.integers(0, 4), mode=st.sampled_from(["min", "max"]))
def test_kept_is_best_k_union_latest_n(values, keep_best, keep_latest, mode):
    if keep_best == 0 and keep_latest == 0:
        keep_latest = 1
    p = CheckpointPolicy(monitor="m", mode=mode, keep_best=keep_best, keep_latest=keep_latest)
    records = [Record(i, p.stored_value({"m": v}) if v is not None else None)
               for i, v in enumerate(values)]
    kept = set(p.kept(records))
    finite = [r for r in records if r.value is not None and math.isfinite(r.value)]
    sign = 1 if mode == "min" else -1
    best = {r.step for r in sorted(finite, key=lambda r: (sign * r.value, r.step))[:keep_best]}
    latest = {r.step for r in sorted(records, key=lambda r: -r.step)[:keep_latest]}
    assert kept == best | latest
    best_rec = p.best(records)
    if finite:
        assert math.isfinite(best_rec.value)
        assert all(sign * best_rec.value <= sign * r.value for r in finite)
    else:
        assert best_rec is None


@settings(max_examples=200, deadline=None)
@given(values=st.lists(metric, min_size=1, max_size=40), keep_best=st.integers(1, 3),
       keep_latest=st.integers(0, 3))
def test_online_run_keeps_true_best_and_never_a_nan(values, keep_best, keep_latest):
    """Saving online (decide, write, prune) ends with the same set as the offline rule."""
    p = CheckpointPolicy(monitor="m", mode="min", keep_best=keep_best, keep_latest=keep_latest)
    records, written = [], []
    for step, v in enumerate(values):
        value = p.stored_value({"m": v}) if v is not None else None
        if p.should_save(value, records, due=True):
            written.append(Record(step, value))
            records.append(Record(step, value))
            records = [r for r in records if r.step in p.kept(records)]
    finite = [r for r in written if r.value is not None]
    if finite:
        true_best = min(finite, key=lambda r: (r.value, r.step))
        assert p.best(records) == true_best
    assert all(r.value is None or math.isfinite(r.value) for r in records)
    if keep_latest == 0:  # nothing written that was deleted at once
        assert all(r.value is not None for r in written)


@pytest.mark.parametrize("cost,step,budget,expected", [
    (1.0, 0.1, 0.01, 1000), (0.05, 0.5, 0.01, 10), (0.0, 0.1, 0.01, 1), (2.0, 1.0, 0.1, 20),
])
def test_auto_interval_holds_budget(cost, step, budget, expected):
    every = auto_interval(cost, step, overhead_budget=budget)
    assert every == expected
    assert cost / (every * step) <= budget + 1e-12


def test_auto_interval_young_daly():
    # cost 10 s, MTBF 2 h: sqrt(2 * 10 * 7200) = 379.47 s -> 380 steps of 1 s
    assert auto_interval(10.0, 1.0, mtbf_hours=2.0) == math.ceil(math.sqrt(2 * 10 * 7200))


def test_auto_every_leaves_the_schedule_to_the_manager():
    auto = CheckpointPolicy(every="auto")
    assert not auto.is_due(5)
    both = CheckpointPolicy(every="auto", every_n_epochs=2)
    assert both.is_due(5, epoch=2) and not both.is_due(5, epoch=1)
