"""The policy as pure logic: no disk, no JAX."""

import dataclasses
import datetime
import json
import math
import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxckpt.policy import (AnyKeep, AnySave, BestN, CheckpointPolicy, EpochInterval,
                            EveryNSeconds, EveryNSteps, KeepAll, KeepReason, LatestN,
                            MetricError, Objective, Predicate, Record, ResumePoint, SaveContext,
                            SpecificSteps, StepInterval, TimeInterval, auto_interval,
                            metric_mode, resolve_mode)

# -- the one classifier of metric names ----------------------------------------------------

LOWER_IS_BETTER = [
    # issue 14, bug 1: loss-like names that also hold a score word
    "val_dice_loss", "iou_loss", "f1_loss", "ssim_loss", "top1_error", "top5_err",
    # the loss/error words themselves
    "loss", "val_loss", "error", "err", "mse", "val_mse", "mae", "rmse", "nll", "perplexity",
    "ppl", "wer", "cer", "distance", "edit_distance", "val_mean_squared_error",
    "mean_absolute_percentage_error", "kl_divergence", "categorical_crossentropy",
    "cross_entropy", "valLoss", "acc_loss", "train/loss", "cosine_distance", "brier_score",
]
HIGHER_IS_BETTER = [
    # issue 14, bug 2: higher-is-better names that were read as min
    "mean_io_u", "io_u", "binary_io_u", "one_hot_mean_io_u", "meanIoU", "mIoU",
    "cosine_similarity", "pearson_correlation", "concordance_correlation",
    "sensitivity_at_specificity", "specificity_at_sensitivity", "acc1", "val_acc5", "mAP50",
    "recall@10",
    # the recognised scores
    "acc", "val_acc", "accuracy", "top1", "top5", "top5_accuracy", "auc", "val_auc", "f1",
    "eval/f1", "F1Score", "precision", "recall", "iou", "val_iou", "miou", "map", "mAP",
    "val_mAP50-95", "dice", "bleu", "rouge", "rougeL", "psnr", "ssim", "reward", "return",
    "mean_reward", "score", "ndcg", "ndcg@10", "mrr", "hits@10", "r2", "r2_score",
]
UNREADABLE = ["lr", "learning_rate", "grad_norm", "epoch", "val_foo", "likelihood", "time"]


@pytest.mark.parametrize("name", LOWER_IS_BETTER)
def test_loss_and_error_names_are_min_whatever_else_they_contain(name):
    assert metric_mode(name) == "min"
    assert resolve_mode(name, "auto") == "min"
    assert CheckpointPolicy(monitor=name).resolved_mode == "min"


@pytest.mark.parametrize("name", HIGHER_IS_BETTER)
def test_scores_are_max(name):
    assert metric_mode(name) == "max"
    assert CheckpointPolicy(monitor=name).resolved_mode == "max"


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_name_is_refused_never_guessed(name):
    assert metric_mode(name) is None
    with pytest.raises(ValueError, match=r"mode='min'.*mode='max'"):
        CheckpointPolicy(monitor=name)
    assert CheckpointPolicy(monitor=name, mode="max").resolved_mode == "max"


@pytest.mark.parametrize("name,hint", [
    ("val_los", "is 'los' a misspelt 'loss'?"), ("val_acuracy", "a misspelt 'accuracy'"),
])
def test_a_misspelt_name_is_refused_with_a_hint(name, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        CheckpointPolicy(monitor=name)


@pytest.mark.parametrize("monitor,mode,warns", [
    ("val_loss", "max", True), ("val_acc", "min", True), ("top1_error", "max", True),
    ("val_loss", "min", False), ("val_acc", "max", False), ("val_loss", "auto", False),
    ("grad_norm", "max", False), ("grad_norm", "min", False),
])
def test_explicit_mode_contradicting_the_name_warns(monitor, mode, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CheckpointPolicy(monitor=monitor, mode=mode)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert bool(messages) == warns, messages
    if warns:
        assert monitor in messages[0] and f"mode={mode!r}" in messages[0]


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(monitor="val_loss", mode="lowest"), "mode must be"),
    (dict(keep_latest=-1), "keep_latest"),
    (dict(keep_latest=None), "keep_all=True"),
    (dict(monitor="val_loss", keep_best=-1), "keep_all=True"),
    (dict(monitor="val_loss", keep_best=-2), "keep_best"),
    (dict(monitor="val_loss", keep_best=0, keep_latest=0), "keep nothing"),
    (dict(keep_best=2), "needs a metric"),
    (dict(mode="max"), "without a monitor"),
    (dict(every_n_steps=0), "every_n_steps"),
    (dict(every_n_epochs=1.5), "every_n_epochs"),
    (dict(every_seconds=-1), "every_seconds"),
    (dict(monitor="val_loss", min_delta=-0.1), "min_delta"),
    (dict(min_delta=0.1), "needs a metric"),
    (dict(every="often"), "every must be"),
    (dict(every="auto", overhead_budget=0), "overhead_budget"),
    (dict(mtbf_hours=3), "only applies"),
    (dict(every=5, every_n_steps=3), "disagree"),
    (dict(keep_all=True, keep_every_n_steps=10), "already keeps every"),
    (dict(keep_all=True, keep_time_interval=60), "already keeps every"),
    (dict(keep_every_n_steps=0), "keep_every_n_steps"),
    (dict(every_n_steps=300, keep_every_n_steps=1000), "keep_every_n_steps=900"),
    (dict(keep_time_interval=0), "keep_time_interval"),
    (dict(initial_value_threshold=0.5), "needs a metric"),
    (dict(monitor="val_loss", initial_value_threshold=math.nan), "finite"),
    (dict(save_on_steps=[]), "non-empty"),
    (dict(save_on_steps="10"), "list of steps"),
    (dict(save_on_steps=[1.5]), "int steps"),
    (dict(save_predicate=3), "function"),
    (dict(keep_all="yes"), "keep_all"),
])
def test_contradictory_or_meaningless_options_raise_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointPolicy(**kwargs)


def test_defaults_and_normalisation():
    assert CheckpointPolicy().keep_best == 0
    assert CheckpointPolicy(monitor="val_loss").keep_best == 1
    assert CheckpointPolicy(every=7).every_n_steps == 7
    assert CheckpointPolicy(keep_time_interval=datetime.timedelta(hours=1)).keep_time_interval \
        == 3600.0
    assert CheckpointPolicy(save_on_steps=[30, 10, 10]).save_on_steps == (10, 30)
    assert CheckpointPolicy(keep_latest=0, keep_all=True).kept([Record(1), Record(2)]) == {
        1: (KeepReason("all"),), 2: (KeepReason("all"),)}


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


# -- when to save: each rule, then the policy's union -------------------------------------

@pytest.mark.parametrize("rule,ctx,due", [
    (StepInterval(10), SaveContext(20), True),
    (StepInterval(10), SaveContext(21), False),
    (EpochInterval(5), SaveContext(100, epoch=5), True),
    (EpochInterval(5), SaveContext(100, epoch=4), False),
    (EpochInterval(5), SaveContext(100), False),  # mid-epoch: never by the epoch rule
    (TimeInterval(60), SaveContext(7, now=61.0, last_save_time=0.0), True),
    (TimeInterval(60), SaveContext(7, now=59.0, last_save_time=0.0), False),
    (TimeInterval(60), SaveContext(7, now=5.0), True),  # nothing saved yet
    (SpecificSteps(frozenset({3, 8})), SaveContext(8), True),
    (SpecificSteps(frozenset({3, 8})), SaveContext(9), False),
    (Predicate(lambda step: step % 7 == 0), SaveContext(14), True),
    (Predicate(lambda step: step % 7 == 0), SaveContext(15), False),
    (AnySave((StepInterval(10), SpecificSteps(frozenset({3})))), SaveContext(3), True),
    (AnySave((StepInterval(10), SpecificSteps(frozenset({3})))), SaveContext(4), False),
    (AnySave(()), SaveContext(4), False),
])
def test_save_rules(rule, ctx, due):
    assert rule.due(ctx) is due


def test_time_rule_needs_the_clock():
    with pytest.raises(ValueError, match="now="):
        TimeInterval(60).due(SaveContext(1))


@pytest.mark.parametrize("kwargs,call,due", [
    (dict(every_n_steps=10, every_seconds=60), dict(step=20, now=0.0, last_save_time=0.0), True),
    (dict(every_n_steps=10, every_seconds=60), dict(step=21, now=59.0, last_save_time=0.0),
     False),
    (dict(every_n_steps=10, every_seconds=60), dict(step=21, now=61.0, last_save_time=0.0),
     True),
    (dict(every_n_epochs=5), dict(step=100, epoch=5), True),
    (dict(every_n_epochs=5), dict(step=100, epoch=4), False),
    (dict(every_n_epochs=5), dict(step=100), False),
    (dict(), dict(step=3), True),  # no schedule: every call
    (dict(save_on_steps=[5, 50]), dict(step=50), True),
    (dict(save_on_steps=[5, 50]), dict(step=51), False),  # a schedule: not every call
    (dict(save_predicate=lambda s: s > 90), dict(step=91), True),
    (dict(save_predicate=lambda s: s > 90), dict(step=9), False),
    (dict(every_n_steps=100, save_on_steps=[7]), dict(step=7), True),
    (dict(every="auto"), dict(step=5), False),  # the manager's interval decides
    (dict(every="auto", every_n_epochs=2), dict(step=5, epoch=2), True),
    (dict(every="auto", every_n_epochs=2), dict(step=5, epoch=1), False),
])
def test_is_due_is_any_configured_rule(kwargs, call, due):
    assert CheckpointPolicy(**kwargs).is_due(**call) is due


# -- what to keep: each rule, then the policy's union --------------------------------------

MIN = Objective("val_loss", "min")
RECS = [Record(1, 0.5, 10.0), Record(2, 0.3, 20.0), Record(3, None, 25.0, has_metrics=False),
        Record(4, 0.4, 40.0), Record(6, 0.2, 95.0)]


@pytest.mark.parametrize("rule,expected", [
    (LatestN(2), {6: ("latest", 1), 4: ("latest", 2)}),
    (LatestN(0), {}),
    (BestN(2, MIN), {6: ("best", 1), 2: ("best", 2)}),
    (BestN(2, Objective("val_loss", "min", threshold=0.35)), {6: ("best", 1), 2: ("best", 2)}),
    (BestN(3, Objective("val_loss", "min", threshold=0.35)), {6: ("best", 1), 2: ("best", 2)}),
    (BestN(1, Objective("acc", "max")), {1: ("best", 1)}),
    (EveryNSteps(2), {2: ("every_n_steps", None), 4: ("every_n_steps", None),
                      6: ("every_n_steps", None)}),
    (EveryNSeconds(15), {1: ("every_n_seconds", None), 3: ("every_n_seconds", None),
                         4: ("every_n_seconds", None), 6: ("every_n_seconds", None)}),
    (EveryNSeconds(30), {1: ("every_n_seconds", None), 4: ("every_n_seconds", None),
                         6: ("every_n_seconds", None)}),
    (KeepAll(), {s: ("all", None) for s in (1, 2, 3, 4, 6)}),
    (ResumePoint(), {}),  # the newest has metrics
])
def test_keep_rules(rule, expected):
    got = rule.keep(RECS)
    assert got == {s: (KeepReason(*r),) for s, r in expected.items()}


def test_resume_point_keeps_the_newest_only_while_it_has_no_metrics():
    no_metrics = [Record(1, 0.5), Record(2, has_metrics=False), Record(3, has_metrics=False)]
    assert ResumePoint().keep(no_metrics) == {3: (KeepReason("latest", 1),)}
    assert ResumePoint().keep(no_metrics + [Record(4, 0.9)]) == {}
    assert ResumePoint().keep([]) == {}


def test_any_keep_merges_reasons_in_rule_order_without_repeats():
    rule = AnyKeep((BestN(1, MIN), LatestN(1), ResumePoint(), EveryNSteps(3)))
    recs = [Record(3, 0.1), Record(4, 0.5), Record(6, has_metrics=False)]
    assert rule.keep(recs) == {3: (KeepReason("best", 1), KeepReason("every_n_steps")),
                               6: (KeepReason("latest", 1), KeepReason("every_n_steps"))}


def test_every_n_seconds_needs_times():
    with pytest.raises(ValueError, match="time=None"):
        EveryNSeconds(10).keep([Record(1, 0.5)])


def test_keep_reason_is_typed_and_prints_for_the_edge():
    assert KeepReason("best", 1) == KeepReason("best", 1) != KeepReason("best", 2)
    assert [str(r) for r in (KeepReason("best", 1), KeepReason("best", 2),
                             KeepReason("latest", 1), KeepReason("latest", 2),
                             KeepReason("every_n_steps"))] == \
        ["best #1", "best #2", "latest", "latest #2", "every_n_steps"]


def test_record_without_metrics_has_no_value():
    with pytest.raises(ValueError, match="has_metrics=False"):
        Record(3, 0.5, has_metrics=False)


# -- the tutorial and the bugs of issue 14 ---------------------------------------------------


def run_online(policy, values, *, due=lambda step: True, times=None):
    """Offer ``values`` one step each, as the manager does: decide, write, prune."""
    records, written = [], []
    for step, v in enumerate(values, start=1):
        has_metrics = v != "none"
        value = policy.stored_value({policy.monitor: v}) if has_metrics else None
        t = times[step - 1] if times else None
        if policy.should_save(value, records, due=due(step), step=step, time=t,
                              has_metrics=has_metrics):
            records.append(Record(step, value, t, has_metrics, policy.improves(value, records)))
            written.append(step)
            kept = policy.kept(records)
            records = [r for r in records if r.step in kept]
    return records, written


def tutorial_losses():
    """50 epochs: best val_loss 0.61 at epoch 45, epoch 50 ends at 0.629."""
    losses = [1.2 - 0.0125 * e for e in range(1, 45)]  # 1.1875 .. 0.65
    return losses + [0.61, 0.615, 0.62, 0.625, 0.627, 0.629]


def test_tutorial_run_keeps_best_45_and_latest_50():
    p = CheckpointPolicy(monitor="val_loss", mode="min")
    records, _ = run_online(p, tutorial_losses())
    assert p.kept(records) == {45: (KeepReason("best", 1),), 50: (KeepReason("latest", 1),)}
    assert p.best(records).step == 45


@pytest.mark.parametrize("keep_latest", [0, 1, 2])
def test_bug4_best_with_min_delta_does_not_depend_on_keep_latest(keep_latest):
    # 0.95 and 0.9 do not beat 1.0 by more than 0.1; neither does 0.97: best stays step 1.
    p = CheckpointPolicy(monitor="val_loss", min_delta=0.1, keep_latest=keep_latest)
    records, written = run_online(p, [1.0, 0.95, 0.9, 0.97])
    assert p.best(records).step == 1
    assert 1 in {r.step for r in records}  # never deleted
    assert written == ([1] if keep_latest == 0 else [1, 2, 3, 4])


def test_improvement_chain_survives_deleting_its_older_members():
    # 0.92 is no improvement on 1.0 (min_delta 0.1); 0.85 is. Once step 1 is deleted, only
    # the stored `improved` flags still say 0.85 is the best (0.92 is within 0.1 of it).
    p = CheckpointPolicy(monitor="val_loss", min_delta=0.1, keep_best=2, keep_latest=1)
    records, _ = run_online(p, [1.0, 0.92, 0.85, 0.95])
    assert [r.step for r in records] == [2, 3, 4]
    assert p.best(records).step == 3
    assert [r.step for r in p.ranked(records)] == [3, 2, 4]
    unflagged = [dataclasses.replace(r, improved=None) for r in records]
    assert MIN.head(unflagged).step == 3  # min_delta 0: plain best by value
    assert Objective("val_loss", "min", 0.1).head(unflagged).step == 2  # why flags exist


def test_keep_latest_zero_writes_only_improvements():
    p = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=0)
    recs = [Record(1, 0.5, improved=True)]
    assert p.should_save(0.6, recs, due=True) is None
    assert p.should_save(0.4, recs, due=True) == KeepReason("best", 1)
    assert p.should_save(float("nan"), recs, due=True) is None


def test_not_due_but_new_best_is_written():
    p = CheckpointPolicy(monitor="val_loss", every_n_epochs=10)
    assert p.should_save(0.1, [Record(1, 0.5)], due=False) == KeepReason("best", 1)
    assert p.should_save(0.9, [Record(1, 0.5)], due=False) is None
    assert p.should_save(0.1, [Record(1, 0.5)], due=True) == KeepReason("best", 1)
    assert p.should_save(0.9, [Record(1, 0.5)], due=True) == KeepReason("latest", 1)


@pytest.mark.parametrize("kwargs,step,time,expected", [
    (dict(keep_every_n_steps=100), 200, None, KeepReason("every_n_steps")),
    (dict(keep_every_n_steps=100), 250, None, None),
    (dict(keep_time_interval=60), 250, 70.0, KeepReason("every_n_seconds")),
    (dict(keep_time_interval=60), 250, 50.0, None),
    (dict(keep_all=True), 251, 1.0, KeepReason("all")),
])
def test_a_due_save_is_written_when_a_retention_rule_would_keep_it(kwargs, step, time,
                                                                   expected):
    p = CheckpointPolicy(monitor="val_loss", keep_latest=0, **kwargs)
    recs = [Record(100, 0.5, 0.0, improved=True)]
    assert p.should_save(0.9, recs, due=True, step=step, time=time) == expected
    assert p.should_save(0.9, recs, due=False, step=step, time=time) is None


def test_metric_less_checkpoints_are_latest_never_best_and_replaced_only_by_newer():
    p = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=0)
    records, written = run_online(p, [0.5, "none", 0.7, "none", "none"])
    assert written == [1, 2, 4, 5]  # 0.7 is neither best nor latest-kept
    assert p.kept(records) == {1: (KeepReason("best", 1),), 5: (KeepReason("latest", 1),)}
    assert p.best(records).step == 1
    assert p.should_save(None, records, due=False, has_metrics=False) is None


@pytest.mark.parametrize("mode,threshold,values,best,written", [
    ("min", 0.5, [0.7, 0.6, 0.4, 0.45], 3, [3, 4]),
    ("min", 0.5, [0.7, 0.6], None, []),
    ("max", 0.8, [0.5, 0.9, 0.85], 2, [2, 3]),
])
def test_initial_value_threshold_must_be_beaten_to_be_best(mode, threshold, values, best,
                                                            written):
    p = CheckpointPolicy(monitor="m", mode=mode, keep_best=2, keep_latest=0,
                         initial_value_threshold=threshold)
    records, wrote = run_online(p, values)
    assert wrote == written
    assert (p.best(records).step if p.best(records) else None) == best


# -- stored form -----------------------------------------------------------------------------


def test_json_round_trip_stores_the_resolved_mode():
    p = CheckpointPolicy(monitor="val_acc", keep_best=2, every_n_steps=10, min_delta=0.01,
                         keep_every_n_steps=100, keep_time_interval=60.0,
                         initial_value_threshold=0.3, save_on_steps=[5, 7])
    data = json.loads(json.dumps(p.to_json()))
    assert data["mode"] == "max" and data["save_on_steps"] == [5, 7]
    again = CheckpointPolicy.from_json(data)
    assert dataclasses.replace(p, mode="max") == again
    assert again.to_json() == data


def test_from_json_fills_missing_fields_and_rejects_unknown_ones():
    old = {"monitor": "val_loss", "mode": "auto", "keep_best": 1, "keep_latest": 1}
    assert CheckpointPolicy.from_json(old) == CheckpointPolicy(monitor="val_loss")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['keep_newest'\]"):
        CheckpointPolicy.from_json({**old, "keep_newest": 3})
    with pytest.raises(TypeError, match="JSON object"):
        CheckpointPolicy.from_json([1, 2])


def test_a_predicate_is_stored_as_null_and_must_be_passed_again():
    p = CheckpointPolicy(save_predicate=lambda step: step % 3 == 0)
    data = p.to_json()
    assert data["save_predicate"] is None and json.dumps(data)
    assert CheckpointPolicy.from_json(data).save_predicate is None
    with pytest.raises(ValueError, match="pass the policy again"):
        CheckpointPolicy.from_json({**data, "save_predicate": "lambda s: True"})


# -- the kept set against an independent oracle ---------------------------------------------

metric = st.one_of(st.integers(-6, 6).map(lambda i: i / 4), st.just(float("nan")),
                   st.just(float("inf")), st.just(float("-inf")))
event = st.tuples(st.integers(1, 3), st.integers(0, 4),
                  st.one_of(metric, st.just("none")), st.booleans())
options = st.fixed_dictionaries({
    "mode": st.sampled_from(["min", "max"]),
    "keep_best": st.integers(0, 3),
    "keep_latest": st.integers(0, 3),
    "keep_all": st.booleans(),
    "keep_every": st.sampled_from([None, 1, 2, 3]),  # times every_n_steps (or 2)
    "keep_time_interval": st.sampled_from([None, 3.0, 7.0]),
    "min_delta": st.sampled_from([0.0, 0.25, 1.0]),
    "initial_value_threshold": st.sampled_from([None, -0.5, 0.5]),
    "every_n_steps": st.sampled_from([None, 1, 2, 3]),
    "every_n_epochs": st.sampled_from([None, 1, 2]),
    "every_seconds": st.sampled_from([None, 3.0]),
    "save_on_steps": st.sampled_from([None, (4, 9, 10)]),
    "predicate": st.booleans(),
})


def pred(step):
    return step % 5 == 1


def build_policy(o):
    keep_every = o["keep_every"] and o["keep_every"] * (o["every_n_steps"] or 2)
    kwargs = dict(
        monitor="m", mode=o["mode"], keep_best=o["keep_best"], keep_latest=o["keep_latest"],
        keep_all=o["keep_all"], min_delta=o["min_delta"],
        keep_every_n_steps=None if o["keep_all"] else keep_every,
        keep_time_interval=None if o["keep_all"] else o["keep_time_interval"],
        initial_value_threshold=o["initial_value_threshold"],
        every_n_steps=o["every_n_steps"], every_n_epochs=o["every_n_epochs"],
        every_seconds=o["every_seconds"], save_on_steps=o["save_on_steps"],
        save_predicate=pred if o["predicate"] else None)
    if not (kwargs["keep_best"] or kwargs["keep_latest"] or kwargs["keep_all"]
            or kwargs["keep_every_n_steps"] or kwargs["keep_time_interval"]):
        kwargs["keep_latest"] = 1
    return CheckpointPolicy(**kwargs)


def oracle(p, events):
    """The kept steps and the best step, straight from the definitions, in one pass."""
    sign = 1 if p.resolved_mode == "min" else -1
    k = p.keep_best

    def beats(a, b):
        return sign * a < sign * b - p.min_delta

    def eligible(v):
        return v not in (None, "none") and math.isfinite(v) and (
            p.initial_value_threshold is None or beats(v, p.initial_value_threshold))

    step, now, epoch, last_save, last_interval = 0, 0.0, 0, 0.0, None
    head, offered, written = None, [], []  # offered: every eligible (value, step)
    for gap, dt, v, epoch_end in events:
        step, now = step + gap, now + dt
        epoch_end = epoch_end and v != "none"
        epoch += epoch_end
        schedule = [p.every_n_steps and step % p.every_n_steps == 0,
                    p.every_n_epochs and epoch_end and epoch % p.every_n_epochs == 0,
                    p.every_seconds and now - last_save >= p.every_seconds,
                    p.save_on_steps and step in p.save_on_steps,
                    p.save_predicate and pred(step)]
        configured = [p.every_n_steps, p.every_n_epochs, p.every_seconds, p.save_on_steps,
                      p.save_predicate]
        due = any(schedule) if any(x is not None for x in configured) else True
        enters_best = False
        if eligible(v):
            if head is None or beats(v, head[0]):
                head = (v, step)
            offered.append((v, step))
            rest = sorted((x for x in offered if x != head), key=lambda x: (sign * x[0], x[1]))
            enters_best = k > 0 and (v, step) in [head] + rest[:k - 1]
        interval_keeps = p.keep_time_interval is not None and (
            last_interval is None or now - last_interval >= p.keep_time_interval)
        kept_if_due = (p.keep_latest > 0 or p.keep_all or v == "none" or interval_keeps
                       or (p.keep_every_n_steps and step % p.keep_every_n_steps == 0))
        if enters_best or (due and kept_if_due):
            written.append((step, now, v))
            last_save = now
            if interval_keeps:
                last_interval = now
    steps = [s for s, _, _ in written]
    kept = set(steps[::-1][: p.keep_latest])
    if k and head is not None:
        rest = sorted((x for x in offered if x != head), key=lambda x: (sign * x[0], x[1]))
        kept |= {s for _, s in [head] + rest[:k - 1]}
    if p.keep_every_n_steps:
        kept |= {s for s in steps if s % p.keep_every_n_steps == 0}
    if p.keep_time_interval:
        last = None
        for s, t, _ in written:
            if last is None or t - last >= p.keep_time_interval:
                kept.add(s)
                last = t
    if p.keep_all:
        kept |= set(steps)
    if written and written[-1][2] == "none":
        kept.add(written[-1][0])
    return kept, (head[1] if head and k else None)


def reopen(p, records):
    """A new process: the policy and the records come back from their stored form."""
    again = CheckpointPolicy.from_json(json.loads(json.dumps(p.to_json())))
    if p.save_predicate is not None:  # code is not stored: the user passes it again
        again = dataclasses.replace(again, save_predicate=p.save_predicate)
    return again, [Record(**json.loads(json.dumps(dataclasses.asdict(r)))) for r in records]


@settings(max_examples=150, deadline=None)
@given(o=options, events=st.lists(event, max_size=40), reopen_at=st.sets(st.integers(0, 40)))
def test_kept_set_equals_oracle_for_every_option_combined(o, events, reopen_at):
    p = build_policy(o)
    records, step, now, epoch, last_save = [], 0, 0.0, 0, 0.0
    for i, (gap, dt, v, epoch_end) in enumerate(events):
        if i in reopen_at:
            p, records = reopen(p, records)
        step, now = step + gap, now + dt
        has_metrics = v != "none"
        epoch += epoch_end and has_metrics
        due = p.is_due(step, epoch=epoch if epoch_end and has_metrics else None, now=now,
                       last_save_time=last_save)
        value = p.stored_value({"m": v}) if has_metrics else None
        if p.should_save(value, records, due=due, step=step, time=now, has_metrics=has_metrics):
            records.append(Record(step, value, now, has_metrics, p.improves(value, records)))
            last_save = now
            kept = p.kept(records)
            records = [r for r in records if r.step in kept]
    expected_kept, expected_best = oracle(p, events)
    assert {r.step for r in records} == set(p.kept(records)) == expected_kept
    assert all(r.value is None or math.isfinite(r.value) for r in records)
    if p.keep_best:
        best = p.best(records)
        assert (best.step if best else None) == expected_best


@settings(max_examples=120, deadline=None)
@given(values=st.lists(st.one_of(metric, st.none()), max_size=40), keep_best=st.integers(0, 4),
       keep_latest=st.integers(0, 4), mode=st.sampled_from(["min", "max"]))
def test_kept_is_best_k_union_latest_n_without_min_delta(values, keep_best, keep_latest, mode):
    """Without min_delta the best-K are simply the K best values (ties: earlier step), even
    for records that carry no ``improved`` flag (a directory from an older writer)."""
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
        assert all(sign * best_rec.value <= sign * r.value for r in finite)
    else:
        assert best_rec is None


# -- every="auto" ------------------------------------------------------------------------------


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


class _Loop:
    """A training loop on a simulated clock driving :class:`AutoInterval` as the writer
    does: ``observe_call`` at every ``save`` call, ``observe_saved`` after a write,
    ``observe_save`` from the background when the write commits ``write_s`` later.

    A save blocks ``blocked_s``; the step right after it takes ``after_s`` more (it copies
    the state the write still reads) and every step started while the write is in flight
    ``shared_s`` more (the write shares the cores): the loop's real cost, which the
    write's own time need not show. ``lost_s`` adds it all up.
    """

    def __init__(self, budget, *, step_s=0.1, blocked_s=0.01, write_s=0.15, after_s=0.3,
                 shared_s=0.1, sync=False):
        from jaxckpt.schedule import AutoInterval

        self.t = 0.0
        self.auto = AutoInterval(CheckpointPolicy(every="auto", overhead_budget=budget),
                                 clock=lambda: self.t)
        self.step_s, self.blocked_s, self.write_s = step_s, blocked_s, write_s
        self.after_s, self.shared_s, self.sync = after_s, shared_s, sync
        self.saved: list[int] = []
        self.lost_s = 0.0
        self._commit: tuple[int, float] | None = None
        self._after = False

    def run(self, steps: int) -> float:
        """Train ``steps`` steps, calling save after each; the fraction of time saving took."""
        start = self.t
        for step in range(1, steps + 1):
            extra = (self.after_s if self._after else 0.0) + \
                (self.shared_s if self._commit is not None else 0.0)
            self._after = False
            self.t += self.step_s + extra
            self.lost_s += extra
            if self._commit is not None and self.t >= self._commit[1]:
                self.auto.observe_save(self._commit[0], self.blocked_s, self.write_s)
                self._commit = None
            self.auto.observe_call(step)
            if self.auto.due(step, self.saved[-1] if self.saved else None):
                blocked = self.blocked_s + (self.write_s if self.sync else 0.0)
                self.t += blocked
                self.lost_s += blocked
                if self.sync:  # the write, then its commit, inside save()
                    self.auto.observe_save(step, self.blocked_s, self.write_s)
                else:
                    self._commit = (step, self.t + self.write_s)
                self.auto.observe_saved(step)
                self.saved.append(step)
                self._after = True
        return (self.t - start) / (steps * self.step_s) - 1.0


@pytest.mark.parametrize("kw", [
    dict(),  # a quick write; the step after it copies the state and shares the cores
    dict(write_s=1.0, after_s=0.0, shared_s=0.02),  # a long write slowing each step a little
    dict(write_s=0.4, after_s=0.0, sync=True),  # a synchronous save: blocking is the cost
])
@pytest.mark.parametrize("budget", [0.02, 0.05, 0.2])
def test_every_auto_holds_its_budget_when_a_save_costs_the_loop_more_than_its_write(kw,
                                                                                  budget):
    """The cost of a save is what the loop lost, measured on the loop's clock.

    Counting blocking plus write time (the first release) priced the first case's save at
    0.16 s while the loop lost 0.41 s to it: 2.5x the budget. The overhead must stay within
    the budget, and not far below it (saving more rarely than the budget allows).
    """
    loop = _Loop(budget, **kw)
    overhead = loop.run(20_000)
    assert len(loop.saved) > 3
    assert budget * 0.6 <= overhead <= budget * 1.02, (overhead, loop.auto.save_cost_s)
    assert loop.auto.save_cost_s == pytest.approx(loop.lost_s / len(loop.saved), rel=0.05)


def test_every_auto_never_saves_while_a_write_is_in_flight():
    """A save that costs the loop nothing (priced at 0 s) would make every step due: each
    save then waits for the write before it. Saves come once the previous one committed."""
    loop = _Loop(0.05, blocked_s=0.0, after_s=0.0, shared_s=0.0, write_s=1.0)
    loop.run(2_000)
    assert loop.auto.save_cost_s == pytest.approx(0.0, abs=1e-9)
    gaps = [b - a for a, b in zip(loop.saved, loop.saved[1:])]
    assert len(gaps) > 100 and min(gaps) >= 10  # 1.0 s writes, 0.1 s steps


def test_every_auto_prices_its_first_save_once_a_step_time_is_known():
    """The first call saves before any step was timed; its cost is priced at the first
    interval without a write in flight, and saves wait for that price."""
    loop = _Loop(0.05)
    loop.run(1)
    assert loop.saved == [1] and loop.auto.save_cost_s is None
    loop.run(4)  # steps 1-4 again on the simulated clock: the save is still being priced
    assert loop.auto.save_cost_s is not None and loop.auto.step_time_s == pytest.approx(0.1)
    assert loop.saved == [1]


def test_every_auto_counts_a_wait_for_the_previous_write_once():
    """A save that waits for the previous write (Orbax writes one at a time) closes that
    write's window; the wait is the previous save's cost, not both saves'."""
    from jaxckpt.schedule import AutoInterval

    t = [0.0]
    auto = AutoInterval(CheckpointPolicy(every="auto", overhead_budget=0.05),
                        clock=lambda: t[0])
    auto.step_time_s = 0.1
    auto.observe_call(10)
    auto.observe_saved(10)  # window of step 10 opens at 0.0
    t[0] = 0.1
    auto.observe_call(11)  # its write is still in flight
    t[0] = 0.2
    auto.observe_call(12)
    # the save at 12 waits 0.5 s for step 10's commit, then writes
    t[0] = 0.7
    auto.observe_save(10, 0.0, 0.7)
    auto.observe_saved(12)
    assert auto.save_cost_s == pytest.approx(0.7 - 2 * 0.1)
    t[0] = 0.8
    auto.observe_save(12, 0.0, 0.1)
    auto.observe_call(13)  # the window of 12 opened at 0.7, one step at 0.1: cost 0
    assert auto.save_cost_s == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)


@pytest.mark.parametrize("kw,reads", [
    (dict(every_n_steps=10, monitor="val_loss"), False), (dict(every_n_epochs=1), False),
    (dict(save_on_steps=[3]), False), (dict(every_seconds=60), True),
    (dict(keep_time_interval=3600), True), (dict(every="auto"), True),
])
def test_a_policy_says_whether_its_decisions_read_the_clock(kw, reads):
    """What decides whether the processes of a job must take process 0's answer."""
    assert CheckpointPolicy(**kw).reads_clock is reads


def test_every_auto_prices_a_save_at_least_at_what_its_call_blocked():
    """The window's estimate is the difference of two large numbers; steps a little faster
    than the average made a cheap save come out at 0 s (and every step due). The time the
    saving call itself took is measured directly: the price never falls below it."""
    from jaxckpt.schedule import AutoInterval

    t = [0.0]
    auto = AutoInterval(CheckpointPolicy(every="auto", overhead_budget=0.05),
                        clock=lambda: t[0])
    auto.step_time_s = 0.1
    auto.observe_call(10)
    t[0] = 0.02
    auto.observe_saved(10)  # save() blocked 20 ms
    for step in range(11, 20):
        t[0] += 0.09  # steps 10 % faster than the average
        auto.observe_call(step)
    t[0] += 0.09
    auto.observe_save(10, 0.02, 0.5)
    auto.observe_call(20)  # window: 0.92 s for 10 steps of 0.1 s -> -0.08 s
    assert auto.save_cost_s == pytest.approx(0.02)
    assert auto.due(23, 20) is False and auto.due(24, 20) is True  # 0.02 / 0.05 / 0.1 s: 4


def test_every_auto_saves_again_after_a_failed_write():
    """A failed write never commits: its window must not keep every later save from
    being due (the writer reports the failure with ``write_failed``)."""
    loop = _Loop(0.05)
    loop.run(200)
    saves = len(loop.saved)
    loop.auto.observe_call(201)
    loop.auto.observe_saved(201)  # a write that will fail: no observe_save for it
    loop._commit = None
    assert not any(loop.auto.due(s, 201) for s in range(202, 2000))
    loop.auto.write_failed()
    assert loop.auto.due(2000, 201) and saves >= 2
