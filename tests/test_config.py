from pathlib import Path

import pytest
import yaml

from effad_hpc.config import CONFIG_FILENAME, config_hash, load_config, write_resolved_config
from effad_hpc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "mvtec_ad.yaml", "mvtec_loco.yaml", "real_cpu.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "configs" / name)
    assert config.data.root.is_absolute()
    assert config.run.out_dir.is_absolute()


def test_thesis_config_holds_thesis_settings():
    config = load_config(REPO / "configs" / "mvtec_ad.yaml")
    backbone = (config.backbone.name, config.backbone.layers, config.data.image_size)
    assert backbone == ("tf_efficientnet_b5.aa_in1k", ["blocks.5"], 768)
    assert (config.teacher.hidden_channels, config.teacher.batch_size, config.teacher.epochs) == (1024, 8, 240)
    assert (config.student.epochs, config.student.patience_fraction, config.student.loss_percentile) == (100, 0.1, 1.0)


def test_unknown_key_names_file_and_dotted_path(make_config, tmp_path):
    path, _ = make_config()
    raw = yaml.safe_load(path.read_text())
    raw["features"]["shard_count"] = 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "features.shard_count: unknown key" in str(err.value)


@pytest.mark.parametrize("key, value, fragment", [
    ("features.batch_size", "eight", "features.batch_size"),
    ("features.batch_size", 2.5, "features.batch_size"),
    ("features.batch_size", "8", "features.batch_size"),  # no silent string-to-int coercion
    ("features.dtype", "float64", "features.dtype"),
    ("data.validation_fraction", 1.5, "data.validation_fraction"),
    ("run.device", "tpu", "run.device"),
])
def test_wrong_types_and_values_are_rejected(make_config, key, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        make_config({key: value})


def test_missing_required_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(path)


def test_overrides_pass_the_same_validation(make_config):
    path, _ = make_config()
    config = load_config(path, ["features.shards=5", "backbone.layers=[blocks.3]", "student.lr=1e-3"])
    assert config.features.shards == 5 and config.backbone.layers == ["blocks.3"] and config.student.lr == 0.001
    with pytest.raises(ConfigError, match=r"features\.shards"):
        load_config(path, ["features.shards=many"])
    with pytest.raises(ConfigError, match=r"data\.nope: unknown key"):
        load_config(path, ["data.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY.SUB=VALUE"):
        load_config(path, ["features.shards"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(path, ["seed.x=1"])
    # a partial distillation backbone keeps the paper's WideResNet-101 for the keys it leaves out
    config = load_config(path, ["distillation.images=/data/imagenet", "distillation.backbone.cache_dir=/shared/hf"])
    assert config.distillation.backbone.name == "wide_resnet101_2.tv_in1k"
    assert config.distillation.backbone.layers == ["layer2", "layer3"]
    assert str(config.distillation.backbone.cache_dir) == "/shared/hf"
    # a glob is text on the command line, though YAML would read `*...` as an alias
    config = load_config(path, ["distillation.images=/data/imagenet", "distillation.pattern=*/train/good/*"])
    assert config.distillation.pattern == "*/train/good/*"
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, ["data.categories=[fabric, grid"])


def test_resolved_config_and_stable_hash(make_config, tmp_path):
    path, config = make_config()
    # Same content in another key order gives the same hash.
    raw = yaml.safe_load(path.read_text())
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text(yaml.safe_dump(dict(reversed(list(raw.items()))), sort_keys=False))
    assert config_hash(load_config(reordered)) == config_hash(config)
    assert config_hash(load_config(path, ["seed=1"])) != config_hash(config)

    digest = write_resolved_config(config, tmp_path / "out")
    written = tmp_path / "out" / CONFIG_FILENAME
    assert written.read_text().splitlines()[0] == f"# config hash: {digest}"
    assert config_hash(load_config(written)) == digest  # the resolved file means the same thing


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
