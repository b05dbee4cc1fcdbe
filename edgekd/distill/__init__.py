"""Knowledge distillation: KD loss terms, feature adapters, the teacher-student objective, k-fold driver, KD report."""

from edgekd.distill.features import FeatureAdapter, align_spatial
from edgekd.distill.folds import fold_recipe, fold_teacher, kfold_preflight, run_kfold
from edgekd.distill.losses import LOSS_TERMS, DistillLoss, KDBatch, build_distill_loss, kl_divergence
from edgekd.distill.objective import (DistillObjective, TeacherInput, TeacherLogitCache, build_objective,
                                      load_teacher)
from edgekd.distill.report import comparison_report
from edgekd.distill.run import distill_recipe, warn_about_distill
from edgekd.distill.unlabeled import build_unlabeled, check_pool_for_folds, refuse_held_out_pool

__all__ = ["LOSS_TERMS", "DistillLoss", "DistillObjective", "FeatureAdapter", "KDBatch", "TeacherInput",
           "TeacherLogitCache", "align_spatial", "build_distill_loss", "build_objective", "build_unlabeled",
           "check_pool_for_folds", "comparison_report", "distill_recipe", "fold_recipe", "fold_teacher",
           "kfold_preflight", "kl_divergence", "load_teacher", "refuse_held_out_pool", "run_kfold",
           "warn_about_distill"]
