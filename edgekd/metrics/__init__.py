"""Metrics: clinical classification metrics (scikit-learn) and their plots.

The plotting names are imported lazily: `import edgekd.metrics` does not load matplotlib.
"""

from edgekd.metrics.calibration import calibration_report, ece, plot_reliability
from edgekd.metrics.classification import (classification_metrics, confusion, largest_class_share,
                                          one_class_warning, partial_auc_above_tpr, positive_class_index)
from edgekd.metrics.failures import confused_pairs, plot_failure_grid
from edgekd.metrics.report import evaluation_report, write_csv_log
from edgekd.metrics.uncertainty import bootstrap_intervals, choose_threshold, decide, delong_test

__all__ = ["bootstrap_intervals", "calibration_report", "choose_threshold", "decide", "delong_test", "ece",
           "plot_reliability",
           "classification_metrics", "confused_pairs", "confusion", "confusion_figure", "evaluation_report", "finish_roc",
           "roc_line",
           "largest_class_share", "one_class_warning", "partial_auc_above_tpr", "plot_confusion", "positive_class_index", "plot_curves", "plot_failure_grid", "plt",
           "save_figure", "write_csv_log"]


def __getattr__(name: str):
    if name in ("confusion_figure", "finish_roc", "plot_confusion", "plot_curves", "plt", "roc_line", "save_figure"):
        from edgekd.metrics import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'edgekd.metrics' has no attribute {name!r}")
