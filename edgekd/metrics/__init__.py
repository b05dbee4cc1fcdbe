"""Metrics: clinical classification metrics (scikit-learn) and their plots."""

from edgekd.metrics.classification import classification_metrics, confusion, partial_auc_above_tpr

__all__ = ["classification_metrics", "confusion", "partial_auc_above_tpr"]
