"""Data layer: embedded datasets (digits, shapes), image folders / LMDB with attribute tables, the prepared-data
layout (train/test tensors, attributes.csv) and the label classifier that scores generated images."""

from pdae.data.classifier import (
    LabelClassifier,
    evaluate_label_classifier,
    has_label_classifier,
    load_label_classifier,
    save_label_classifier,
    train_label_classifier,
)
from pdae.data.folder import ImageFileDataset, LmdbImageDataset, load_folder_data, open_image_dataset
from pdae.data.prepare import (
    binary_attribute_names,
    load_attributes,
    load_raw_dataset,
    load_split,
    load_validation_ids,
    prepare_dataset,
    split_indices,
    validation_mask,
)
from pdae.data.tables import read_attribute_table

__all__ = [
    "ImageFileDataset",
    "LabelClassifier",
    "LmdbImageDataset",
    "binary_attribute_names",
    "evaluate_label_classifier",
    "has_label_classifier",
    "load_attributes",
    "load_folder_data",
    "load_label_classifier",
    "load_raw_dataset",
    "load_split",
    "load_validation_ids",
    "open_image_dataset",
    "prepare_dataset",
    "read_attribute_table",
    "save_label_classifier",
    "split_indices",
    "train_label_classifier",
    "validation_mask",
]
