"""Config values that cannot be right are errors naming the file, key and reason: keys given twice in a YAML
file, an empty or repeated category list, an unknown model in `effad-hpc config`, and image sizes that the
backbone's strides do not divide or that leave its deepest layer a grid under 3x3."""

from __future__ import annotations

import pytest
import torch
import yaml

from effad_hpc.cli import main
from effad_hpc.config import load_config
from effad_hpc.errors import ConfigError
from effad_hpc.features import extract_category
from effad_hpc.features.backbones import FeatureLayer, check_input_size
from effad_hpc.hpc.profiles import load_profile
from effad_hpc.training.sources import ComputedFeatures

from tests.conftest import tiny_config, tiny_config_dict

# --- duplicate keys ----------------------------------------------------------------------------


def test_a_key_given_twice_names_the_file_line_and_section(tmp_path, synthetic_ad):
    path = tmp_path / "twice.yaml"
    text = yaml.safe_dump(tiny_config_dict(synthetic_ad, tmp_path / "run"), sort_keys=False)
    path.write_text(text + "student:\n  lr: 0.001\n  epochs: 3\n  lr: 0.002\n")
    lines = path.read_text().splitlines()
    first, second = (i + 1 for i, line in enumerate(lines) if line.startswith("  lr:"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: line {second}: duplicate key 'lr' in section student (first at line {first})"


def test_duplicate_keys_at_the_top_and_deep_down(tmp_path):
    path = tmp_path / "top.yaml"
    path.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match=r"top.yaml: line 2: duplicate key 'name' at the top level \(first at line 1"):
        load_config(path)
    path.write_text("name: a\ndistillation:\n  backbone:\n    layers: [layer2]\n    layers: [layer3]\n")
    with pytest.raises(ConfigError, match="line 5: duplicate key 'layers' in section distillation.backbone"):
        load_config(path)


def test_merge_keys_may_be_overridden_and_overrides_are_checked_too(tmp_path, synthetic_ad):
    raw = tiny_config_dict(synthetic_ad, tmp_path / "run")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(raw) + "defaults: &stage {lr: 0.001, epochs: 3}\n")
    with pytest.raises(ConfigError, match="defaults: unknown key"):  # the anchor parses; only the key is unknown
        load_config(path)
    path.write_text(yaml.safe_dump(raw) + "teacher: &stage {lr: 0.001, epochs: 3}\nstudent: {<<: *stage, lr: 0.01}\n")
    assert load_config(path).student.lr == 0.01 and load_config(path).student.epochs == 3
    with pytest.raises(ConfigError, match="not valid YAML.*duplicate key 'shards'"):
        load_config(path, ["features={shards: 2, shards: 3}"])


def test_a_profile_with_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text("stages:\n  extract:\n    gres: gpu:1\n    gres: gpu:2\n")
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(err.value) == f"{path}: line 4: duplicate key 'gres' in section stages.extract (first at line 3)"


# --- categories and models ---------------------------------------------------------------------


def test_an_empty_category_list_is_an_error_not_every_category(make_config):
    with pytest.raises(ConfigError, match=r"data.categories: empty list; leave it out \(null\) for every category"):
        make_config({"data.categories": []})
    assert make_config({"data.categories": None})[1].data.categories is None


def test_a_category_listed_twice_is_an_error(make_config):
    with pytest.raises(ConfigError, match="data.categories: 'grid' listed more than once"):
        make_config({"data.categories": ["grid", "fabric", "grid"]})
    assert make_config({"data.categories": ["grid", "fabric"]})[1].data.categories == ["grid", "fabric"]


def test_config_command_rejects_an_unknown_model_like_train(make_config, capsys):
    path, _ = make_config()
    assert main(["config", "--config", str(path), "models=[patchcore, patchcorex]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effad-hpc: error: model 'patchcorex' is not known; known models: ") and err.count("\n") == 1
    assert main(["config", "--config", str(path), "models=[patchcore]"]) == 0


# --- image sizes and backbone strides ----------------------------------------------------------

LITE0 = [FeatureLayer("blocks.2", 40, 8), FeatureLayer("blocks.4", 112, 16)]


@pytest.mark.parametrize(("size", "message"), [
    (70, "data.image_size 70: not a multiple of 16, the stride of layer blocks.4 (use 64 or 80)"),
    (36, "data.image_size 36: not a multiple of 16, the stride of layer blocks.4 (use 48)"),  # 32 is too small
    (32, "data.image_size 32: layer blocks.4 (stride 16) gives a 2x2 grid; need at least 3x3 (use >= 48)"),
    (16, "data.image_size 16: layer blocks.4 (stride 16) gives a 1x1 grid; need at least 3x3 (use >= 48)"),
])
def test_image_sizes_that_cannot_be_right(size, message):
    with pytest.raises(ConfigError) as err:
        check_input_size(LITE0, size, "data.image_size")
    assert str(err.value) == message


def test_image_sizes_that_fit_and_the_deepest_stride_sets_the_minimum():
    for size in (48, 64, 256, 768):
        check_input_size(LITE0, size, "data.image_size")
    check_input_size([FeatureLayer("blocks.5", 304, 32)], 96, "data.image_size")
    with pytest.raises(ConfigError, match=r"64: layer blocks.5 \(stride 32\) gives a 2x2 grid; .* \(use >= 96\)"):
        check_input_size([FeatureLayer("blocks.5", 304, 32)], 64, "data.image_size")


def test_extraction_refuses_an_image_size_the_strides_do_not_divide(make_config):
    _, config = make_config({"data.image_size": 70})
    with pytest.raises(ConfigError, match=r"^data.image_size 70: not a multiple of 16, the stride of layer blocks.4"):
        extract_category(config, "fabric", show_progress=False)


def test_on_the_fly_features_name_the_baselines_own_image_size(synthetic_ad, tmp_path):
    config = tiny_config(synthetic_ad, tmp_path, {"padim.image_size": 40, "padim.feature_source": "on_the_fly"})
    with pytest.raises(ConfigError, match=r"^padim.image_size 40: not a multiple of 16, .* \(use 48\)"):
        ComputedFeatures(config, "fabric", torch.device("cpu"), backbone=config.backbone, image_size=40)
    config = tiny_config(synthetic_ad, tmp_path, {"data.image_size": 32})
    with pytest.raises(ConfigError, match=r"^data.image_size 32: layer blocks.4 \(stride 16\) gives a 2x2 grid"):
        ComputedFeatures(config, "fabric", torch.device("cpu"))


def test_spades_pooled_global_layer_may_have_a_small_grid(synthetic_ad, tmp_path):
    config = tiny_config(synthetic_ad, tmp_path)
    layers = ["blocks.2", "blocks.3", "blocks.6"]  # blocks.6: stride 32, a 2x2 grid at 64 px
    backbone = config.backbone.model_copy(update={"layers": layers})
    source = ComputedFeatures(config, "fabric", torch.device("cpu"), layers, "pyramid_global", backbone, 64)
    assert source.size("train") > 0  # pooled to one vector: the grid does not matter
    with pytest.raises(ConfigError, match=r"^data.image_size 64: layer blocks.6 \(stride 32\) gives a 2x2 grid"):
        ComputedFeatures(config, "fabric", torch.device("cpu"), layers, "finest", backbone, 64)
