import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from effad_hpc.config import BackboneConfig
from effad_hpc.errors import ConfigError, WeightsError
from effad_hpc.features import build_backbone
from effad_hpc.features.backbones import create_model
from effad_hpc.features.weights import load_pretrained


def test_lite0_offline_weights_classify_a_real_photo():
    """The package's weights, mapped onto timm's model, see a daisy in scikit-learn's flower.jpg."""
    model = create_model(BackboneConfig())
    source = load_pretrained(model, BackboneConfig())
    assert "efficientnet-lite0" in source
    model.eval()
    image = Image.fromarray(load_sample_image("flower.jpg"))
    x = create_transform(**resolve_data_config({}, model=model))(image).unsqueeze(0)
    with torch.no_grad():
        top5 = model(x).softmax(-1)[0].topk(5).indices.tolist()
    labels = [ImageNetInfo().index_to_description(i) for i in top5]
    assert any("daisy" in label for label in labels), labels
    # A random network does not: the mapping, not luck, makes the prediction.
    random_model = create_model(BackboneConfig(pretrained=False)).eval()
    with torch.no_grad():
        assert random_model(x).softmax(-1)[0].topk(5).indices.tolist() != top5


def test_extractor_is_frozen_and_reports_its_layers():
    backbone = build_backbone(BackboneConfig(layers=["blocks.2", "blocks.4"]))
    shapes = [(layer.name, layer.channels, layer.stride) for layer in backbone.layers]
    assert shapes == [("blocks.2", 40, 8), ("blocks.4", 112, 16)]
    extractor = backbone.extractor
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    out = extractor(torch.rand(2, 3, 96, 96))
    assert out["blocks.2"].shape == (2, 40, 12, 12) and out["blocks.4"].shape == (2, 112, 6, 6)
    assert backbone.layers[1].map_size(96) == 6


def test_efficientnet_b5_stage5_matches_the_thesis_shapes():
    backbone = build_backbone(BackboneConfig(name="tf_efficientnet_b5.aa_in1k", layers=["blocks.5"], pretrained=False))
    assert (backbone.layers[0].channels, backbone.layers[0].stride) == (304, 32)
    assert backbone.layers[0].map_size(768) == 24


def test_missing_weights_name_the_backbone_and_prefetch(tmp_path):
    config = BackboneConfig(name="tf_efficientnet_b5.aa_in1k", layers=["blocks.5"], cache_dir=tmp_path / "empty-cache")
    with pytest.raises(WeightsError) as err:
        build_backbone(config)
    message = str(err.value)
    assert "tf_efficientnet_b5.aa_in1k" in message and "timm/tf_efficientnet_b5.aa_in1k" in message
    assert "effad-hpc prefetch" in message


def test_weights_path_is_loaded_or_named(tmp_path):
    reference = create_model(BackboneConfig(pretrained=False))
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    built = build_backbone(BackboneConfig(weights_path=tmp_path / "weights.pth"))
    assert built.weights_source == str(tmp_path / "weights.pth")
    assert torch.equal(built.extractor.model.conv_stem.weight, reference.conv_stem.weight)
    with pytest.raises(WeightsError, match="missing.pth: file not found"):
        build_backbone(BackboneConfig(weights_path=tmp_path / "missing.pth"))
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="wrong.pth: does not fit the model"):
        build_backbone(BackboneConfig(weights_path=tmp_path / "wrong.pth"))


def test_unknown_backbone_and_layer_are_config_errors():
    with pytest.raises(ConfigError, match="backbone.layers: .* no module 'blocks.99'"):
        build_backbone(BackboneConfig(layers=["blocks.99"]))
    with pytest.raises(ConfigError, match="backbone.name"):
        build_backbone(BackboneConfig(name="no_such_net"))


def test_features_are_deterministic_on_cpu():
    extractor = build_backbone(BackboneConfig()).extractor
    images = torch.from_numpy(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(extractor(images)["blocks.4"], extractor(images)["blocks.4"])
