"""Data: sources (folder, CSV manifest, MedMNIST .npz, idx, built-in), splits, transforms, samplers."""

from edgekd.data.dataset import (FILE_SOURCES, DataModule, ImageDataset, build_checkpoint_data, build_data,
                                 check_class_order, check_model_splits, check_trained_splits, checkpoint_path_hint,
                                 class_weights, data_path_key, duplicate_notes, epoch_seed, recipe_positive,
                                 same_split_settings,
                                 split_listing, split_tables, validate_images)
from edgekd.data.sources import (FASHION_CLASSES, MEDMNIST_CLASSES, Source, Table, list_images, load_source,
                                 medmnist_classes, pixel_digest, split_folders, split_name)
from edgekd.data.splits import kfold_indices, make_splits, stratified_subset
from edgekd.data.transforms import build_transforms, chw_tensor, preprocess_spec

__all__ = ["FASHION_CLASSES", "FILE_SOURCES", "MEDMNIST_CLASSES", "DataModule", "ImageDataset", "Source", "Table",
           "build_checkpoint_data", "build_data", "build_transforms", "check_class_order", "check_model_splits",
           "check_trained_splits", "chw_tensor", "data_path_key", "same_split_settings", "checkpoint_path_hint", "class_weights",
           "duplicate_notes", "epoch_seed", "kfold_indices", "list_images", "load_source", "make_splits",
           "medmnist_classes", "pixel_digest", "preprocess_spec", "recipe_positive", "split_folders", "split_listing", "split_name", "split_tables",
           "stratified_subset", "validate_images"]
