"""Robustness under image corruptions: seeded uint8 corruptions (torch-free) and their evaluation."""

from edgekd.robustness.corruptions import check_names, check_severities
from edgekd.robustness.evaluate import run_corruption_eval, run_failure_analysis

__all__ = ["check_names", "check_severities", "run_corruption_eval", "run_failure_analysis"]
