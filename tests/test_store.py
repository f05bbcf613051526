import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from effad_hpc.config import SyntheticConfig
from effad_hpc.data import ImageDataset, load_category
from effad_hpc.data.synthetic import generate
from effad_hpc.errors import ConfigError, StoreError
from effad_hpc.features import FeatureDataset, build_backbone, extract_category, read_manifest, store_dir
from effad_hpc.features.extract import split_keys
from effad_hpc.features.store import shard_bounds


def backbone_reference(config, category, split):
    """Features of a split computed directly with the backbone, without the store.

    Batches are formed as the extractor forms them (per shard, ``features.batch_size``): CPU
    convolution kernels differ with the batch size in the last bits, and the store must hold
    exactly what the backbone returned. The backbone runs as extraction runs it: batch norms
    folded, in the layout ``inference.channels_last`` names (tests/test_performance.py checks that
    against the unfolded NCHW forward).
    """
    samples = load_category(config, category).samples(split)
    dataset = ImageDataset(samples, config.data.image_size)
    extractor = build_backbone(config.backbone).extractor.optimize(config.inference.channels_last)
    outputs = []
    for shard in range(config.features.shards):
        lo, hi = shard_bounds(len(samples), shard, config.features.shards)
        for start in range(lo, hi, config.features.batch_size):
            stop = min(hi, start + config.features.batch_size)
            images = torch.stack([dataset[i]["image"] for i in range(start, stop)])
            with torch.no_grad():
                outputs.append({k: v.contiguous().numpy() for k, v in extractor(images).items()})
    return {layer: np.concatenate([o[layer] for o in outputs]) for layer in config.backbone.layers}, samples


def test_store_returns_exactly_the_backbone_output(make_config):
    _, config = make_config()
    result = extract_category(config, "washer", show_progress=False)
    assert result.manifest_written and len(result.written) == 6  # 3 splits x 2 shards
    for split in ("train", "validation", "test"):
        expected, samples = backbone_reference(config, "washer", split)
        dataset = FeatureDataset(result.store, split, expected_key=split_keys(config, "washer")[split])
        assert len(dataset) == len(samples)
        assert dataset.sample_ids == [s.sample_id for s in samples]
        assert dataset.labels.tolist() == [s.label for s in samples]
        for i in range(len(dataset)):
            item = dataset[i]
            for layer, array in expected.items():
                np.testing.assert_array_equal(item["features"][layer].numpy(), array[i])
    manifest = read_manifest(result.store)
    assert manifest["splits"]["test"]["num_samples"] == len(samples)
    assert [layer["name"] for layer in manifest["layers"]] == ["blocks.2", "blocks.4"]


def test_float16_storage_is_chunked_per_sample_and_close(make_config):
    _, config = make_config({"features.dtype": "float16", "features.compression": "lzf"})
    store = extract_category(config, "grid", show_progress=False).store
    with h5py.File(store / "test-00000-of-00002.h5") as shard:
        data = shard["features/blocks.4"]
        assert data.dtype == np.float16 and data.chunks == (1, *data.shape[1:]) and data.compression == "lzf"
    expected, _ = backbone_reference(config, "grid", "test")
    stored = np.stack([item["features"]["blocks.4"].numpy() for item in FeatureDataset(store, "test")])
    np.testing.assert_allclose(stored, expected["blocks.4"], rtol=2e-3, atol=2e-3)


def test_rerun_skips_complete_shards_and_redoes_corrupt_ones(make_config):
    _, config = make_config()
    store = extract_category(config, "washer", show_progress=False).store
    mtimes = {p.name: p.stat().st_mtime_ns for p in store.glob("*.h5")}
    again = extract_category(config, "washer", show_progress=False)
    assert again.written == [] and len(again.skipped) == 6
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("*.h5")} == mtimes

    victim = store / "train-00001-of-00002.h5"
    with open(victim, "r+b") as fh:  # flip bytes in the middle: the checksum no longer matches
        fh.seek(victim.stat().st_size // 2)
        fh.write(b"\x00" * 64)
    repaired = extract_category(config, "washer", show_progress=False)
    assert repaired.written == ["train shard 1/2"]
    json_record = json.loads((store / "train-00001-of-00002.json").read_text())
    from effad_hpc.utils.atomic import sha256_file
    assert sha256_file(victim) == json_record["sha256"]


def test_changed_config_redoes_the_store_and_reader_checks_the_key(make_config):
    _, config = make_config()
    store = extract_category(config, "grid", show_progress=False).store
    _, other = make_config({"data.image_size": 96})
    with pytest.raises(StoreError, match="extracted with another config"):
        FeatureDataset(store, "train", expected_key=split_keys(other, "grid")["train"])
    assert len(extract_category(other, "grid", show_progress=False).written) == 6


def test_separate_shard_writers_complete_the_manifest(make_config):
    _, config = make_config({"features.shards": 3})
    first = extract_category(config, "grid", shard=(2, 3), show_progress=False)
    assert not first.manifest_written
    with pytest.raises(StoreError, match="no manifest"):
        FeatureDataset(first.store, "train")
    extract_category(config, "grid", shard=(0, 3), show_progress=False)
    last = extract_category(config, "grid", shard=(1, 3), show_progress=False)
    assert last.manifest_written
    assert len(FeatureDataset(last.store, "train")) == len(load_category(config, "grid").samples("train"))
    with pytest.raises(ConfigError, match="features.shards=3"):
        extract_category(config, "grid", shard=(0, 4), show_progress=False)


def test_reader_with_workers_random_access_and_streaming(make_config):
    _, config = make_config({"features.shards": 3})
    store = extract_category(config, "washer", show_progress=False).store
    dataset = FeatureDataset(store, "test", layers=["blocks.4"])
    direct = torch.stack([dataset[i]["features"]["blocks.4"] for i in range(len(dataset))])

    seen = torch.zeros_like(direct)
    loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        seen[batch["index"]] = batch["features"]["blocks.4"]
    torch.testing.assert_close(seen, direct, rtol=0, atol=0)

    streamed = torch.zeros_like(direct)
    count = 0
    for batch in DataLoader(dataset.stream(batch_size=2), batch_size=None, num_workers=2):
        streamed[batch["index"]] = batch["features"]["blocks.4"]
        count += len(batch["index"])
    assert count == len(dataset)
    torch.testing.assert_close(streamed, direct, rtol=0, atol=0)


def test_killed_extraction_then_rerun_ends_with_the_right_shards(tmp_path, make_config):
    """SIGKILL a real `effad-hpc extract` after its first shard, rerun it: the finished shard is
    kept, no partial file counts as finished, and the final store equals a direct computation."""
    data_root = tmp_path / "slow"
    generate("ad", data_root, ["washer"], SyntheticConfig(seed=1, size=128, num_train=40, num_test_good=4,
                                                           num_test_per_defect=2))
    path, config = make_config({"data.image_size": 320, "features.shards": 4, "features.batch_size": 1},
                               data_root=data_root)
    store = store_dir(config, "washer")
    command = [sys.executable, "-m", "effad_hpc", "extract", "--config", str(path), "--category", "washer", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_record = store / "train-00000-of-00004.json"
    deadline = time.monotonic() + 120
    while not first_record.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "extraction did not finish its first shard in time"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (store / "manifest.json").exists()
    finished = {p.stem for p in store.glob("*.json")}
    kept = {p.name: p.stat().st_mtime_ns for p in store.glob("*.h5") if p.stem in finished}
    assert "train-00000-of-00004.h5" in kept
    # Every final .h5 name without a record is treated as unfinished (none should exist anyway:
    # a shard is renamed only when complete, and its record follows).
    leftovers = [p for p in store.iterdir() if ".tmp-" in p.name]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {len(finished)} complete shard(s)" in rerun.stdout
    assert (store / "manifest.json").exists()
    assert not [p for p in store.iterdir() if ".tmp-" in p.name], f"stale temporaries left: {leftovers}"
    assert {n: (store / n).stat().st_mtime_ns for n in kept} == kept

    for split in ("train", "validation", "test"):
        expected, samples = backbone_reference(config, "washer", split)
        dataset = FeatureDataset(store, split, expected_key=split_keys(config, "washer")[split])
        stored = np.stack([dataset[i]["features"]["blocks.4"].numpy() for i in range(len(dataset))])
        assert dataset.sample_ids == [s.sample_id for s in samples]
        np.testing.assert_array_equal(stored, expected["blocks.4"])
