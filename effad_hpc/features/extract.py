"""Extraction stage: backbone features of a category's train, validation and test splits -> HDF5.

One backbone pass per image; a rerun skips every shard whose file and record are complete and
current (same feature key, checksum intact) and redoes the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader, Subset

from effad_hpc.config import ExperimentConfig, Precision, stable_hash, write_resolved_config
from effad_hpc.data import SPLITS, ImageDataset, category_fingerprints, load_category
from effad_hpc.errors import ConfigError
from effad_hpc.features.backbones import Backbone, build_backbone, check_input_size
from effad_hpc.features.weights import checkpoint_identity
from effad_hpc.features.store import (
    STORE_VERSION,
    SampleInfo,
    ShardWriter,
    completed_record,
    incomplete_reason,
    shard_bounds,
    shard_lock,
    shard_stem,
    write_manifest_if_complete,
)
from effad_hpc.utils.atomic import write_failure
from effad_hpc.utils.device import autocast, resolve_device
from effad_hpc.utils.memory import reused_memory

def feature_key(config: ExperimentConfig) -> str:
    """Hash of the settings that change the stored features (not compression, not sharding)."""
    return stable_hash({
        "store_version": STORE_VERSION,
        "image_size": config.data.image_size,
        "backbone": checkpoint_identity(config.backbone),
        "dtype": config.features.dtype,
    })


def split_keys(config: ExperimentConfig, category: str) -> dict[str, str]:
    """``{split: key}``: the feature settings and the fingerprint of the split's files, so that a
    changed split is extracted again and the others are kept."""
    features = feature_key(config)
    fingerprints = category_fingerprints(config, category)
    return {split: stable_hash({"features": features, "data": fingerprints[split]}) for split in SPLITS}


def store_dir(config: ExperimentConfig, category: str) -> Path:
    """The category's feature store: in the run folder, or in the shared cache under its key."""
    if config.run.shared_dir is not None:
        return config.run.shared_dir / "features" / category / feature_key(config)
    return config.run.out_dir / "features" / category


@dataclass
class ExtractResult:
    store: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manifest_written: bool = False


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def prefetched(batches: Iterable) -> Iterator:
    """``batches`` with the next one produced by a background thread while the caller works on
    the current one: images are decoded and resized (Pillow releases the GIL) while the backbone
    runs. A producer's error is raised here, at the batch it concerns."""
    iterator, end = iter(batches), object()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, iterator, end)
        while (batch := pending.result()) is not end:
            pending = pool.submit(next, iterator, end)
            yield batch


def _extract_shard(backbone: Backbone, loader: DataLoader, writer: ShardWriter, infos: list[SampleInfo],
                   device: torch.device, precision: Precision, progress: Progress, task) -> None:
    np_dtype = writer.dtype
    # worker processes already decode ahead; without them, a thread does
    with reused_memory():
        for batch in loader if loader.num_workers > 0 else prefetched(loader):
            with torch.no_grad(), autocast(device, precision):
                features = backbone.extractor(batch["image"].to(device, non_blocking=True))
            arrays = {name: f.float().contiguous().cpu().numpy().astype(np_dtype) for name, f in features.items()}
            writer.write(arrays, [infos[i] for i in batch["index"].tolist()])
            progress.advance(task, len(batch["index"]))


def extract_category(config: ExperimentConfig, category: str, shard: tuple[int, int] | None = None,
                     show_progress: bool = True, splits: Sequence[str] = SPLITS) -> ExtractResult:
    """Write this category's shards (all of them, or shard I of N) of ``splits`` and the manifest
    once they are complete (a sweep asks for train and validation only: it reads no test image)."""
    num_shards = config.features.shards
    if shard is not None and shard[1] != num_shards:
        raise ConfigError(f"--shard {shard[0]}/{shard[1]}: the config has features.shards={num_shards}")
    shards = [shard[0]] if shard is not None else list(range(num_shards))
    data = load_category(config, category)
    keys = split_keys(config, category)
    folder = store_dir(config, category)
    folder.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, config.run.out_dir)
    result = ExtractResult(folder)

    todo = []
    for split in splits:
        for index in shards:
            name = f"{split} shard {index}/{num_shards}"
            if completed_record(folder, split, index, num_shards, keys[split]) is not None:
                result.skipped.append(name)
            else:
                todo.append((split, index, name))
    if todo:
        backbone = build_backbone(config.backbone)
        check_input_size(backbone.layers, config.data.image_size, "data.image_size")
        device = resolve_device(config.run.device, config.run.precision)
        backbone.extractor.to(device).optimize(config.inference.channels_last)
        size = config.data.image_size
        meta = {"backbone": config.backbone.name, "weights": backbone.weights_source, "image_size": size,
                "dtype": config.features.dtype,
                "layers": [{"name": layer.name, "channels": layer.channels, "stride": layer.stride,
                            "map_size": layer.map_size(size)} for layer in backbone.layers]}
        shapes = {layer.name: (layer.channels, layer.map_size(size), layer.map_size(size))
                  for layer in backbone.layers}
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, disable=not show_progress) as progress:
            for split, index, name in todo:
                with shard_lock(folder, split, index, num_shards):
                    # another job may have written it while this one waited for the lock
                    if completed_record(folder, split, index, num_shards, keys[split]) is not None:
                        result.skipped.append(name)
                        continue
                    _write_shard(config, backbone, device, data.samples(split), folder, split, index, keys[split],
                                 meta, shapes, progress, f"{category} {name}")
                result.written.append(name)
    result.manifest_written = write_manifest_if_complete(folder, keys, num_shards, feature_key(config), splits)
    return result


def _write_shard(config: ExperimentConfig, backbone: Backbone, device: torch.device, samples: list, folder: Path,
                 split: str, index: int, key: str, meta: dict, shapes: dict, progress: Progress,
                 description: str) -> None:
    num_shards, size = config.features.shards, config.data.image_size
    infos = [SampleInfo(i, s.sample_id, s.label, s.defect_type, str(s.path)) for i, s in enumerate(samples)]
    lo, hi = shard_bounds(len(samples), index, num_shards)
    # Subset passes the split's own indices through, so batch["index"] indexes `infos`.
    loader = DataLoader(Subset(ImageDataset(samples, size), range(lo, hi)), batch_size=config.features.batch_size,
                        num_workers=config.features.num_workers, pin_memory=device.type == "cuda")
    try:
        writer = ShardWriter(folder, split, index, num_shards, hi - lo, shapes, config.features.dtype,
                             config.features.compression, config.features.compression_level, feature_key=key,
                             meta=meta)
    except OSError as exc:
        raise write_failure(folder / f"{shard_stem(split, index, num_shards)}.h5", exc) from None
    task = progress.add_task(description, total=hi - lo)
    try:
        _extract_shard(backbone, loader, writer, infos, device, config.run.precision, progress, task)
        writer.close()
    except BaseException as exc:
        writer.abort()
        if (failure := write_failure(writer.final, exc)) is not None:
            raise failure from None
        raise


def store_incomplete_reason(config: ExperimentConfig, category: str) -> str | None:
    """Why the category's store is not complete for this config and data (None when it is)."""
    return incomplete_reason(store_dir(config, category), feature_key(config), split_keys(config, category))
