"""Robustness under image corruptions: seeded uint8 corruptions (torch-free) and their evaluation."""

from edgekd.robustness.corruptions import check_names, check_severities
from edgekd.robustness.evaluate import (check_predictor_source, check_predictor_sources, evaluate_on_folder,
                                        run_corruption_eval, run_failure_analysis, trained_images_warning)

__all__ = ["check_names", "check_predictor_source", "check_predictor_sources", "check_severities",
           "evaluate_on_folder", "run_corruption_eval", "run_failure_analysis", "trained_images_warning"]
