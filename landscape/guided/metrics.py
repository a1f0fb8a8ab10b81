"""Task metrics of a fine-tuned classifier or regressor."""

import math

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


def metrics_for(task: str):
    """The metric names of a task ('classification' or 'regression'), the first being the default."""
    return CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS


def _mcc(y_true, y_pred, n_classes):
    """Matthews correlation (multi-class form of Gorodkin 2004; the binary phi coefficient for 2)."""
    cm = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(cm, (y_true, y_pred), 1)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = math.sqrt(max(s * s - (p * p).sum(), 0.0) * max(s * s - (t * t).sum(), 0.0))
    return float((c * s - (t * p).sum()) / denom) if denom > 0 else 0.0


def _f1(y_true, y_pred, n_classes):
    """Binary: F1 of class 1; multi-class: macro F1."""
    scores = []
    for k in ([1] if n_classes == 2 else range(n_classes)):
        tp = np.sum((y_pred == k) & (y_true == k))
        fp = np.sum((y_pred == k) & (y_true != k))
        fn = np.sum((y_pred != k) & (y_true == k))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def compute_metrics(task, y_true, predictions, n_classes=2):
    """Task metrics: {accuracy, f1, mcc} for class ids, {pearson, spearman} for regression targets.

    Args:
        task: 'classification' or 'regression'.
        y_true: (n,) true class ids or targets.
        predictions: (n,) predicted class ids or values.
        n_classes: the number of classes (for F1).

    Returns:
        {metric: float}.
    """
    y_true, predictions = np.asarray(y_true), np.asarray(predictions)
    if task == "classification":
        return {"accuracy": float(np.mean(y_true == predictions)), "f1": _f1(y_true, predictions, n_classes),
                "mcc": _mcc(y_true, predictions, n_classes)}
    from scipy import stats

    if np.std(predictions) == 0 or np.std(y_true) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(stats.pearsonr(y_true, predictions)[0]),
            "spearman": float(stats.spearmanr(y_true, predictions)[0])}
