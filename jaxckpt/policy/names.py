"""Which direction of a metric is better, read from its name: the one place that decides.

The rule, in order: a name that says loss or error (``loss``, ``err``, ``mse``, ``nll``,
``perplexity``, ``wer``, ``distance``, ...) is ``"min"`` whatever else it contains, so
``val_dice_loss`` and ``top1_error`` are min; a recognised score (``acc``, ``auc``, ``f1``,
``iou``, ``mAP50``, ``bleu``, ``reward``, ...) is ``"max"``; anything else is ``None``, and a
policy that needs a direction refuses it rather than guess.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from typing import Literal

__all__ = ["metric_mode", "resolve_mode", "check_mode"]

Mode = Literal["min", "max", "auto"]

_LOWER_IS_BETTER = frozenset({
    "loss", "losses", "error", "errors", "err", "mse", "mae", "rmse", "msle", "rmsle", "mape",
    "smape", "mase", "nmse", "nrmse", "nll", "perplexity", "ppl", "wer", "cer", "ter",
    "distance", "dist", "divergence", "kl", "kld", "crossentropy", "xent", "ce", "bce",
    "hinge", "huber", "logcosh", "poisson", "regret", "cost", "penalty", "fid", "kid",
    "lpips", "bpd", "bpc", "eer", "ece", "epe", "brier", "chamfer", "hausdorff", "fpr", "fnr",
    "fp", "fn", "falsepositive", "falsepositives", "falsenegative", "falsenegatives",
})

_HIGHER_IS_BETTER = frozenset({
    "acc", "accuracy", "accuracies", "auc", "auroc", "auprc", "aupr", "ap", "map", "f1", "f2",
    "f05", "fbeta", "fscore", "precision", "recall", "sensitivity", "specificity", "tpr",
    "tnr", "tp", "tn", "truepositive", "truepositives", "truenegative", "truenegatives", "ppv",
    "npv", "iou", "miou", "jaccard", "dice", "r2", "rsquared", "bleu", "rouge", "rougel",
    "rougelsum", "meteor", "chrf", "cider", "psnr", "ssim", "similarity", "correlation",
    "corr", "pearson", "spearman", "kendall", "kappa", "mcc", "reward", "rewards", "return",
    "returns", "score", "scores", "ndcg", "mrr", "hits", "hit", "hitrate", "winrate",
    "success", "exactmatch", "top1", "top5", "topk", "elo",
})

# Scores that take a numeric suffix: acc5, top10, mAP50, ap75, recall10, rouge2, ndcg20.
_NUMBERED_SCORES = frozenset({
    "acc", "top", "map", "ap", "recall", "precision", "hits", "hit", "ndcg", "mrr", "iou",
    "rouge", "bleu", "auc",
})


def _words(name: str) -> set[str]:
    """The name's words, their number-less stems and joins of up to three neighbours.

    camelCase and acronyms split first (``mAP50`` -> ``m ap50``, ``MeanIoU`` -> ``mean io u``),
    so Keras's ``mean_io_u`` and ``meanIoU`` both yield ``iou``.
    """
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    tokens = [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]
    words = set(tokens)
    for token in tokens:
        match = re.fullmatch(r"([a-z]+)\d+", token)
        if match and match.group(1) in _NUMBERED_SCORES:
            words.add(match.group(1))
    for size in (2, 3):
        words.update("".join(tokens[i:i + size]) for i in range(len(tokens) - size + 1))
    return words


@functools.lru_cache(maxsize=256)  # pure, and asked at every save() of a policy
def metric_mode(name: str) -> Literal["min", "max"] | None:
    """Whether lower (``"min"``) or higher (``"max"``) values of metric ``name`` are better.

    Args:
      name: a metric name such as ``"val_loss"``, ``"top1_error"``, ``"mean_io_u"``.

    Returns:
      ``"min"`` for a loss or error, ``"max"`` for a recognised score, ``None`` when the name
      says neither (the caller must then be told the mode).
    """
    words = _words(name)
    if words & _LOWER_IS_BETTER:
        return "min"
    if words & _HIGHER_IS_BETTER:
        return "max"
    return None


def resolve_mode(monitor: str | None, mode: Mode) -> Literal["min", "max"]:
    """``mode`` itself, or for ``"auto"`` the direction :func:`metric_mode` reads in the name.

    Raises:
      ValueError: ``mode`` is not min/max/auto, or it is ``"auto"`` and the name says
        neither (never guessed: a wrong guess keeps the worst checkpoint as "best").
    """
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}.")
    if monitor is None:
        return "min"  # nothing is ranked without a metric
    found = metric_mode(monitor)
    if found is None:
        raise ValueError(
            f"cannot tell from its name whether a lower or a higher {monitor!r} is better"
            f"{_misspelling(monitor)}; pass mode='min' (lower is better, like a loss) or "
            "mode='max' (higher is better, like an accuracy).")
    return found


def _misspelling(name: str) -> str:
    """A hint when a word of ``name`` is one letter off a known one (``val_los``)."""
    for word in sorted(_words(name)):
        close = difflib.get_close_matches(word, _LOWER_IS_BETTER | _HIGHER_IS_BETTER, n=1,
                                          cutoff=0.85)
        if close and len(word) > 2:
            return f" (is {word!r} a misspelt {close[0]!r}?)"
    return ""


def check_mode(monitor: str | None, mode: Mode, *, owner: str, stacklevel: int = 3) -> None:
    """Validate ``mode`` for ``monitor`` and warn when an explicit one contradicts the name.

    ``monitor="val_loss", mode="max"`` is almost always a typo that would keep the worst
    checkpoints as best; it stays allowed (a custom metric may be named oddly), but loudly.
    """
    resolve_mode(monitor, mode)
    if mode == "auto" or monitor is None:
        return
    read = metric_mode(monitor)
    if read is not None and read != mode:
        warnings.warn(
            f"{owner}(monitor={monitor!r}, mode={mode!r}): the name reads as "
            f"{'lower' if read == 'min' else 'higher'}-is-better (mode={read!r}). With "
            f"mode={mode!r} the {'highest' if mode == 'max' else 'lowest'} value counts as "
            f"best; pass mode={read!r} or mode='auto' if that is not what you mean.",
            UserWarning, stacklevel=stacklevel)
