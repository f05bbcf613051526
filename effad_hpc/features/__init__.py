"""Frozen backbones and the sharded HDF5 feature store they fill."""

from effad_hpc.features.backbones import Backbone, FeatureExtractor, FeatureLayer, build_backbone
from effad_hpc.features.extract import extract_category, feature_key, store_dir
from effad_hpc.features.store import FeatureDataset, FeatureStream, read_manifest

__all__ = [
    "Backbone", "FeatureDataset", "FeatureExtractor", "FeatureLayer", "FeatureStream", "build_backbone",
    "extract_category", "feature_key", "read_manifest", "store_dir",
]
