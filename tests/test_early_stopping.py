"""EarlyStopping: settings and tracker in one value; patience as Keras and Lightning count it;
the same best epoch whether the weights come from a checkpoint or from memory."""

import json
import warnings

import optax
import pytest

import jaxckpt
from jaxckpt import data
from jaxckpt.early_stopping import EarlyStopping
from jaxckpt.policy import CheckpointPolicy
from _util import MLP, leaves_equal

NAN, INF = float("nan"), float("inf")


def run(es, values):
    """Feed ``values`` epoch by epoch; return (stop epoch or None, best epoch, final value)."""
    for epoch, value in enumerate(values, start=1):
        es, _ = es.update(value, epoch=epoch)
        if es.should_stop:
            return epoch, es.best_epoch, es
    return None, es.best_epoch, es


@pytest.mark.parametrize("patience", [0, 1, 2, 3, 5])
def test_bug3_stops_after_exactly_patience_epochs_without_improvement(patience):
    stop, best, _ = run(EarlyStopping(patience=patience), [1.0] + [2.0] * 10)
    assert best == 1
    assert stop == 1 + max(patience, 1)  # patience 0: the first epoch without improvement


@pytest.mark.parametrize("kwargs,values,stop,best", [
    (dict(patience=2), [1.0, 0.9, 0.95, 0.96, 0.97], 4, 2),
    (dict(patience=2), [1.0, 0.9, 0.95, 0.8, 0.85], None, 4),
    # min_delta: 0.95 and 0.9 do not beat 1.0 by more than 0.1; 0.85 does, too late
    (dict(patience=3, min_delta=0.1), [1.0, 0.95, 0.9, 0.97, 0.85], 4, 1),
    (dict(patience=3, min_delta=0.1), [1.0, 0.95, 0.85, 0.97, 0.8], None, 3),
    (dict(monitor="val_acc", patience=2), [0.5, 0.6, 0.55, 0.7, 0.65, 0.6], 6, 4),
    (dict(monitor="val_acc", mode="max", patience=1, min_delta=0.05), [0.5, 0.54, 0.6], 2, 1),
    # baseline: the first improvement must beat it; epochs that do not, count
    (dict(patience=3, baseline=0.5), [0.6, 0.55, 0.52, 0.4], 3, None),
    (dict(patience=2, baseline=0.5), [0.6, 0.45, 0.5], None, 2),
    # warm-up: the first two epochs are neither best nor counted
    (dict(patience=2, start_from_epoch=2), [0.1, 0.2, 0.5, 0.6, 0.7], 5, 3),
    (dict(patience=2, start_from_epoch=2), [0.1, 0.2, 0.5, 0.6], None, 3),
    # NaN and inf never improve; they count toward patience
    (dict(patience=3), [1.0, NAN, INF, 0.5], None, 4),
    (dict(patience=2), [NAN, 1.0, NAN, NAN], 4, 2),
    (dict(patience=2), [NAN, NAN], 2, None),
    (dict(monitor="val_acc", patience=2), [0.5, -INF, INF], 3, 1),
])
def test_stop_and_best_epochs(kwargs, values, stop, best):
    assert run(EarlyStopping(**kwargs), values)[:2] == (stop, best)


def test_update_is_pure_and_reports_improvement():
    es = EarlyStopping(patience=2)
    first, improved = es.update(0.5)
    assert improved and (first.best, first.best_epoch, first.wait, first.epoch) == (0.5, 1, 0, 1)
    second, improved = first.update(0.7)
    assert not improved and (second.best, second.wait, second.epoch) == (0.5, 1, 2)
    assert (es.best, es.epoch) == (None, 0) and (first.wait, first.epoch) == (0, 1)
    assert second.reset() == es


def test_tracker_round_trips_through_json():
    _, _, es = run(EarlyStopping(monitor="val_acc", patience=4, min_delta=0.01, baseline=0.2,
                                 start_from_epoch=1), [0.1, 0.5, 0.4, 0.45])
    data_ = json.loads(json.dumps(es.to_json()))
    assert EarlyStopping.from_json(data_) == es
    assert (es.best, es.best_epoch, es.wait, es.epoch) == (0.5, 2, 2, 4)


def test_from_json_rejects_unknown_fields_and_reads_the_old_layout():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['patient'\]"):
        EarlyStopping.from_json({"patient": 3})
    old = EarlyStopping.from_json({"best": 0.4, "best_epoch": 3, "wait": 1, "stopped": False})
    assert (old.best, old.best_epoch, old.wait) == (0.4, 3, 1)


def test_resume_keeps_this_runs_settings_and_the_stored_tracker():
    _, _, stored = run(EarlyStopping(patience=2), [0.5, 0.6])
    assert not stored.should_stop and stored.wait == 1
    resumed = EarlyStopping(patience=1).resume(stored)
    assert resumed.patience == 1 and resumed.should_stop  # the new patience, the old count
    assert (resumed.best, resumed.best_epoch, resumed.epoch) == (0.5, 1, 2)


@pytest.mark.parametrize("other", [
    EarlyStopping(monitor="val_acc"), EarlyStopping(min_delta=0.1),
    EarlyStopping(baseline=1.0), EarlyStopping(start_from_epoch=1),
])
def test_resume_with_another_objective_restarts_the_tracker_and_says_so(other):
    _, _, stored = run(EarlyStopping(), [0.5, 0.6, 0.7])
    with pytest.warns(UserWarning, match="starts afresh at epoch 3"):
        resumed = other.resume(stored)
    assert (resumed.best, resumed.best_epoch, resumed.wait, resumed.epoch) == (None, None, 0, 3)


@pytest.mark.parametrize("es,policy,agrees", [
    (EarlyStopping(), CheckpointPolicy(monitor="val_loss"), True),
    (EarlyStopping(mode="min"), CheckpointPolicy(monitor="val_loss"), True),
    (EarlyStopping(min_delta=0.1), CheckpointPolicy(monitor="val_loss", min_delta=0.1), True),
    (EarlyStopping(baseline=2.0),
     CheckpointPolicy(monitor="val_loss", initial_value_threshold=2.0), True),
    # bug 4: the metric name alone is not enough
    (EarlyStopping(min_delta=0.1), CheckpointPolicy(monitor="val_loss"), False),
    (EarlyStopping(monitor="m", mode="min"), CheckpointPolicy(monitor="m", mode="max"), False),
    (EarlyStopping(baseline=2.0), CheckpointPolicy(monitor="val_loss"), False),
    (EarlyStopping(start_from_epoch=3), CheckpointPolicy(monitor="val_loss"), False),
    (EarlyStopping(), CheckpointPolicy(monitor="val_acc"), False),
    (EarlyStopping(), CheckpointPolicy(monitor="val_loss", keep_best=0), False),
    (EarlyStopping(), CheckpointPolicy(), False),
    (EarlyStopping(), None, False),
])
def test_agrees_with_a_policy_only_when_both_judge_best_alike(es, policy, agrees):
    assert es.agrees_with(policy) is agrees


@pytest.mark.parametrize("kwargs,match", [
    (dict(patience=-1), "patience"), (dict(patience=1.5), "patience"),
    (dict(patience=True), "patience"), (dict(min_delta=-0.1), "min_delta"),
    (dict(baseline=NAN), "baseline"), (dict(start_from_epoch=-1), "start_from_epoch"),
    (dict(monitor="grad_norm"), r"mode='min'.*mode='max'"), (dict(mode="lowest"), "mode must"),
])
def test_invalid_settings_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)


def test_a_mode_contradicting_the_name_warns_once_not_every_epoch():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        es = EarlyStopping(monitor="val_loss", mode="max")
        run(es, [0.1, 0.2, 0.3])
    assert len(caught) == 1 and "mode='min'" in str(caught[0].message)


def test_public_name():
    assert jaxckpt.EarlyStopping is EarlyStopping


# -- in Trainer.fit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits(digits_dir):
    ds = data.load_tfds("sklearn_digits", "train", data_dir=digits_dir).map(data.normalize)
    return data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)


def test_fit_restores_the_same_best_epoch_with_or_without_a_checkpoint(splits, tmp_path):
    """Bug 4 end to end: with min_delta the best epoch is the improvement chain's head, not
    the lowest val_loss; every way of getting the weights back agrees on it, and patience 1
    stops one epoch after it. A run interrupted and resumed stops at the same place."""
    es = EarlyStopping(monitor="val_loss", patience=1, min_delta=0.05)
    tracking = CheckpointPolicy(monitor="val_loss", min_delta=0.05, every_n_epochs=1)

    def fit(name, policy=None, **kwargs):
        trainer = jaxckpt.Trainer(MLP(), optax.sgd(0.3), quiet=True)
        checkpoint = tmp_path / name if name else None
        history = trainer.fit(splits["train"], splits["validation"], epochs=12, batch_size=64,
                              checkpoint=checkpoint, policy=policy, early_stopping=es, **kwargs)
        return trainer, history

    memory, h = fit(None)
    stop, best, _ = run(es, [r["val_loss"] for r in h.rows])
    assert stop == len(h.rows) == best + 1 and h.events[-1] == {"event": "early_stop",
                                                                "epoch": stop}
    losses = h.metric("val_loss")
    assert losses.index(min(losses)) + 1 != best  # a lower one came within min_delta
    assert h.best_epoch == best  # the table's best is the tracker's, not the minimum
    val = memory.evaluate(splits["validation"])
    assert val["loss"] == pytest.approx(h.rows[best - 1]["val_loss"], rel=1e-5)

    default_dir, h_default = fit("default")  # the policy ranks without min_delta: from memory
    from_checkpoint, h_tracking = fit("tracking", tracking)
    with jaxckpt.CheckpointManager(tmp_path / "tracking", read_only=True) as mngr:
        best_val = mngr.metrics(mngr.best_step())["val_loss"]
        assert best_val == h_tracking.rows[best - 1]["val_loss"]
    # Stopped inside the epoch after the best; resumed from the best epoch's checkpoint, the
    # tracker (best, wait) must come back with it, or the run would go on past `stop`.
    per_epoch = data.num_batches(splits["train"], 64)
    fit("resumed", tracking, max_steps=best * per_epoch + 3)
    resumed, h_resumed = fit("resumed", tracking)
    assert len(h_default.rows) == len(h_tracking.rows) == len(h_resumed.rows) == stop
    for trainer in (default_dir, from_checkpoint, resumed):
        assert leaves_equal(trainer.state.params, memory.state.params)
