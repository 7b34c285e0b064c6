"""Sequence classification and regression metrics (the GLUE set), in numpy.

Every metric takes optional per-example `weights` of 0 or 1: weight-0 examples are padding
(added to fill the last fixed-shape batch) and are dropped before anything is computed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

TASK_TYPES = ("binary", "multiclass", "regression")


def _select(preds: ArrayLike, labels: ArrayLike,
            weights: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (preds, labels) without the weight-0 (padding) examples."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.shape[:1] != labels.shape[:1]:
    raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in length")
  if weights is not None:
    weights = np.asarray(weights).reshape(-1)
    if weights.shape != labels.shape[:1]:
      raise ValueError(f"weights {weights.shape} do not match labels {labels.shape}")
    if not np.all((weights == 0) | (weights == 1)):
      raise ValueError("weights must be 0 (padding) or 1")
    keep = weights.astype(bool)
    preds, labels = preds[keep], labels[keep]
  if labels.shape[0] == 0:
    raise ValueError("no examples to score (all weights are 0)")
  return preds, labels


def _confusion(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Confusion matrix [true, pred] over the classes seen in either array."""
  classes, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  k, n = len(classes), len(labels)
  return np.bincount(index[:n] * k + index[n:], minlength=k * k).reshape(k, k)


def accuracy(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
  """Fraction of examples whose predicted class equals the label."""
  preds, labels = _select(preds, labels, weights)
  return float(np.mean(preds == labels))


def binary_f1(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
  """F1 of the positive class 1 (classes must be 0/1); 0 when it is never predicted nor true."""
  preds, labels = _select(preds, labels, weights)
  if not np.all(np.isin(preds, (0, 1)) & np.isin(labels, (0, 1))):
    raise ValueError("binary F1 needs classes 0 and 1 only")
  tp = np.sum((preds == 1) & (labels == 1))
  denominator = np.sum(preds == 1) + np.sum(labels == 1)  # 2 tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def macro_f1(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
  """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
  cm = _confusion(*_select(preds, labels, weights))
  tp = np.diag(cm)
  # Every class here occurs in labels or predictions, so 2 tp + fp + fn > 0.
  return float(np.mean(2 * tp / (cm.sum(0) + cm.sum(1))))


def matthews_corrcoef(preds: ArrayLike, labels: ArrayLike,
                      weights: ArrayLike | None = None) -> float:
  """Matthews correlation (Gorodkin's multi-class R_K); 0 when undefined (a constant side)."""
  cm = _confusion(*_select(preds, labels, weights)).astype(np.float64)
  n, correct = cm.sum(), np.trace(cm)
  true, pred = cm.sum(1), cm.sum(0)
  covariance = correct * n - true @ pred
  scale = (n * n - pred @ pred) * (n * n - true @ true)
  return float(covariance / np.sqrt(scale)) if scale else 0.0


def pearson(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
  """Pearson correlation; 0 when undefined (a constant side), NaN for non-finite inputs."""
  x, y = (a.astype(np.float64).reshape(-1) for a in _select(preds, labels, weights))
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    return float("nan")
  x, y = x - x.mean(), y - y.mean()
  scale = np.sqrt(np.dot(x, x) * np.dot(y, y))
  return float(np.clip(np.dot(x, y) / scale, -1.0, 1.0)) if scale else 0.0


def average_ranks(values: ArrayLike) -> np.ndarray:
  """1-based ranks; tied values all get the mean of the ranks they span."""
  values = np.asarray(values).reshape(-1)
  order = np.argsort(values, kind="stable")
  ordered = values[order]
  run_starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
  run_ends = np.r_[run_starts[1:], len(values)]  # exclusive
  run_of = np.repeat(np.arange(len(run_starts)), run_ends - run_starts)
  ranks = np.empty(len(values), np.float64)
  ranks[order] = ((run_starts + run_ends - 1) / 2 + 1)[run_of]
  return ranks


def spearman(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
  """Spearman correlation: Pearson of average ranks (ties share their mean rank)."""
  preds, labels = _select(preds, labels, weights)
  if not (np.all(np.isfinite(preds)) and np.all(np.isfinite(labels))):
    return float("nan")
  return pearson(average_ranks(preds), average_ranks(labels))


def compute(task_type: str, preds: ArrayLike, labels: ArrayLike,
            weights: ArrayLike | None = None) -> dict[str, float]:
  """All metrics of a task type.

  Args:
    task_type: "binary" (accuracy, f1, mcc), "multiclass" (accuracy, macro_f1, mcc) or
      "regression" (pearson, spearman, mse).
    preds: [N] class ids, [N, classes] logits (argmax is taken), or [N] / [N, 1] scores.
    labels: [N] class ids or float targets.
    weights: optional [N] of 0 (padding, ignored) or 1.

  Returns:
    Metric name -> value, plus "num_examples" (weight-1 examples).
  """
  preds, labels = _select(preds, labels, weights)
  if task_type == "regression":
    preds = preds.reshape(-1) if preds.ndim == 2 and preds.shape[1] == 1 else preds
    mse = float(np.mean((preds.astype(np.float64) - labels) ** 2))
    metrics = {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels), "mse": mse}
  elif task_type in ("binary", "multiclass"):
    preds = preds.argmax(-1) if preds.ndim == labels.ndim + 1 else preds
    metrics = {"accuracy": accuracy(preds, labels), "mcc": matthews_corrcoef(preds, labels)}
    if task_type == "binary":
      metrics["f1"] = binary_f1(preds, labels)
    else:
      metrics["macro_f1"] = macro_f1(preds, labels)
  else:
    raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
  return {**metrics, "num_examples": float(len(labels))}
