"""Training: the one trainer, losses, optimizers/schedules, checkpoints, and the recipe runner."""

from edgekd.train.checkpoint import (checkpoints_in_folder, load_checkpoint, load_resumable, load_state,
                                     model_from_checkpoint, save_checkpoint)
from edgekd.train.distributed import distributed_session, is_main_process
from edgekd.train.distributed import rank as process_rank
from edgekd.train.losses import (ClassWeightedCE, FocalLoss, build_loss, check_alpha_fits,
                                 cross_entropy_loss)
from edgekd.train.run import (RUN_MARKERS, RunResult, apply_threads, build_student_model, evaluate_checkpoint,
                              init_weights, keeps_torch_threads, loss_class_weights, remove_earlier_outputs,
                              train_model, train_recipe,
                              untrained_checkpoint, warn_about_data)
from edgekd.train.trainer import (Plugin, SupervisedObjective, Trainer, evaluate, predict_logits, resolve_device,
                                  restore_rng_state, rng_state, seed_everything)

__all__ = ["ClassWeightedCE", "FocalLoss", "Plugin", "RUN_MARKERS", "RunResult", "SupervisedObjective", "Trainer",
           "apply_threads", "build_loss", "build_student_model", "check_alpha_fits", "checkpoints_in_folder",
           "cross_entropy_loss",
           "distributed_session", "evaluate", "evaluate_checkpoint", "init_weights", "is_main_process",
           "keeps_torch_threads",
           "load_checkpoint", "load_resumable", "load_state", "loss_class_weights", "model_from_checkpoint",
           "predict_logits", "process_rank", "remove_earlier_outputs", "resolve_device", "restore_rng_state",
           "rng_state", "save_checkpoint", "seed_everything", "train_model", "train_recipe", "untrained_checkpoint",
           "warn_about_data"]
