"""Sharded HDF5 feature store: one folder per category, one file per split and shard.

Layout of ``<store>/`` (one category)::

    train-00000-of-00004.h5     features of samples [start, stop) of the split
    train-00000-of-00004.json   record of that shard: samples, bytes, sha256, split key
    ...
    manifest.json               all shards of all splits, written once every record exists

Each shard holds ``features/<layer>`` (N, C, H, W) chunked per sample, plus ``index`` (position in
the split), ``sample_id``, ``label``, ``defect_type`` and ``path``. A shard is written under a
temporary name and renamed when complete, then its record is written: a killed writer leaves
either nothing or a shard without a record, and both count as not done. Shards can be written by
separate jobs at the same time (``--shard I/N``); whichever finishes last writes the manifest.

Each split has its own key (the features' settings and a fingerprint of the split's files), so a
changed test split re-extracts the test shards and nothing else. The manifest records every
shard's size and checksum: a store whose shard was truncated or replaced is not complete.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from effad_hpc.errors import StorageError, StoreError
from effad_hpc.utils.atomic import (
    atomic_write_json,
    exclusive_lock,
    new_temp_path,
    publish,
    remove_stale_temps,
    sha256_file,
)

STORE_VERSION = 2
MANIFEST = "manifest.json"
STRING = h5py.string_dtype()


def shard_stem(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}"


def shard_bounds(num_samples: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous [start, stop) of shard ``shard``: sequential reads stay sequential on disk."""
    edges = np.linspace(0, num_samples, num_shards + 1).round().astype(int)
    return int(edges[shard]), int(edges[shard + 1])


@dataclass(frozen=True)
class SampleInfo:
    index: int
    sample_id: str
    label: int
    defect_type: str
    path: str


def shard_lock(folder: Path, split: str, shard: int, num_shards: int):
    """The lock a writer of this shard holds from its completion check to its record: a second
    writer waits, then finds the shard complete; temporaries seen under it are a dead writer's."""
    return exclusive_lock(Path(folder) / f".{shard_stem(split, shard, num_shards)}.lock")


METADATA_BYTES_PER_SAMPLE = 4096
"""Upper bound of a sample's ids, label and path strings and chunk index in an HDF5 shard."""


def _check_free_space(final: Path, num_samples: int, layer_shapes: dict[str, tuple[int, int, int]],
                      dtype: str) -> None:
    """Refuse to start a shard that may not fit: HDF5 cannot recover from a full disk (h5py ends
    the process with a segmentation fault once a write has failed), so the space is checked first,
    against the uncompressed size."""
    itemsize = np.dtype(dtype).itemsize
    needed = (1 << 20) + num_samples * (METADATA_BYTES_PER_SAMPLE + sum(
        channels * height * width * itemsize for channels, height, width in layer_shapes.values()))
    free = shutil.disk_usage(final.parent).free
    if free < needed:
        raise StorageError(f"{final}: cannot write: No space left on device (the shard needs up to "
                           f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)")


class ShardWriter:
    """Fill one shard batch by batch; the file appears under its final name only on ``close``.

    The caller holds the shard's :func:`shard_lock`, so temporaries of this shard that exist when
    the writer starts belong to writers that died, and are removed."""

    def __init__(self, folder: Path, split: str, shard: int, num_shards: int, num_samples: int,
                 layer_shapes: dict[str, tuple[int, int, int]], dtype: str, compression: str,
                 compression_level: int, feature_key: str, meta: dict):
        """``feature_key`` is the split's key; ``meta`` (backbone, layers, ...) goes into the
        shard's record and from there into the manifest, so whichever writer finishes last can
        write the manifest."""
        self.folder, self.stem = Path(folder), shard_stem(split, shard, num_shards)
        self.final = self.folder / f"{self.stem}.h5"
        self.num_samples, self.written = num_samples, 0
        self.dtype, self.feature_key, self.meta = dtype, feature_key, meta
        remove_stale_temps(self.folder, f"{self.stem}.h5")  # leftovers of killed writers
        _check_free_space(self.final, num_samples, layer_shapes, dtype)
        self._tmp = new_temp_path(self.final)
        try:
            self._file = h5py.File(self._tmp, "w")
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        try:
            self._create_datasets(split, shard, num_shards, num_samples, layer_shapes, dtype, compression,
                                  compression_level)
        except BaseException:  # a file system that refuses even the empty datasets: nothing may stay behind
            self.abort()
            raise

    def _create_datasets(self, split: str, shard: int, num_shards: int, num_samples: int,
                         layer_shapes: dict[str, tuple[int, int, int]], dtype: str, compression: str,
                         compression_level: int) -> None:
        options = {}
        if compression != "none" and num_samples > 0:
            options = {"compression": compression}
            if compression == "gzip":
                options["compression_opts"] = compression_level
        for layer, (channels, height, width) in layer_shapes.items():
            self._file.create_dataset(
                f"features/{layer}", shape=(num_samples, channels, height, width), dtype=dtype,
                chunks=(1, channels, height, width) if num_samples else None, **options)
        self._file.create_dataset("index", shape=(num_samples,), dtype=np.int64)
        self._file.create_dataset("label", shape=(num_samples,), dtype=np.int8)
        for name in ("sample_id", "defect_type", "path"):
            self._file.create_dataset(name, shape=(num_samples,), dtype=STRING)
        self._file.attrs.update({"feature_key": self.feature_key, "split": split, "shard": shard,
                                 "num_shards": num_shards, "meta": json.dumps(self.meta, sort_keys=True)})

    def write(self, features: dict[str, np.ndarray], infos: Sequence[SampleInfo]) -> None:
        lo, hi = self.written, self.written + len(infos)
        for layer, array in features.items():
            self._file[f"features/{layer}"][lo:hi] = array
        self._file["index"][lo:hi] = [s.index for s in infos]
        self._file["label"][lo:hi] = [s.label for s in infos]
        self._file["sample_id"][lo:hi] = [s.sample_id for s in infos]
        self._file["defect_type"][lo:hi] = [s.defect_type for s in infos]
        self._file["path"][lo:hi] = [s.path for s in infos]
        self.written = hi

    def close(self) -> dict:
        """Finish the shard, rename it into place, write its record and return the record."""
        if self.written != self.num_samples:
            raise RuntimeError(f"{self.final}: {self.written} of {self.num_samples} samples written")
        self._file.close()
        checksum, size = sha256_file(self._tmp), self._tmp.stat().st_size
        publish(self._tmp, self.final)
        record = {"file": self.final.name, "num_samples": self.num_samples, "sha256": checksum, "bytes": size,
                  "feature_key": self.feature_key, "meta": self.meta}
        atomic_write_json(self.folder / f"{self.stem}.json", record)
        return record

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:  # the write that failed (a full disk) fails again on close; the file goes anyway
            pass
        self._tmp.unlink(missing_ok=True)


def completed_record(folder: Path, split: str, shard: int, num_shards: int, feature_key: str,
                     verify: bool = True) -> dict | None:
    """The record of a shard that is complete and current, else None (the shard must be redone)."""
    stem = shard_stem(split, shard, num_shards)
    record_path, data_path = Path(folder) / f"{stem}.json", Path(folder) / f"{stem}.h5"
    if not (record_path.is_file() and data_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("feature_key") != feature_key or data_path.stat().st_size != record.get("bytes"):
        return None
    if verify and sha256_file(data_path) != record.get("sha256"):
        return None
    return record


def write_manifest_if_complete(folder: Path, split_keys: dict[str, str], num_shards: int, feature_key: str,
                               required: Sequence[str] | None = None) -> bool:
    """Write ``manifest.json`` when every shard of every ``required`` split (default: all) has a
    record with its split's key; it lists every split that is complete (a sweep extracts only
    train and validation, and a later full extraction adds the test split)."""
    entries, meta = {}, None
    for split, key in split_keys.items():
        records = [completed_record(folder, split, shard, num_shards, key, verify=False)
                   for shard in range(num_shards)]
        if None in records:
            if required is None or split in required:
                return False
            continue
        meta = records[0]["meta"]  # identical in every record: same features, same backbone
        entries[split] = {"key": key, "num_samples": sum(r["num_samples"] for r in records),
                          "shards": [{k: v for k, v in r.items() if k not in ("meta", "feature_key")}
                                     for r in records]}
    if meta is None:
        return False
    atomic_write_json(Path(folder) / MANIFEST, {"version": STORE_VERSION, "feature_key": feature_key,
                                                "num_shards": num_shards, **meta, "splits": entries})
    return True


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        pending = sorted(p.name for p in Path(folder).glob("*.h5")) if Path(folder).is_dir() else []
        raise StoreError(f"{path}: no manifest: the feature store is missing or incomplete "
                         f"({len(pending)} shard files present); run `effad-hpc extract` for this category")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: unreadable manifest ({exc}); rerun `effad-hpc extract` for this category") from None
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(f"{path}: store version {manifest.get('version')}, expected {STORE_VERSION}")
    return manifest


def damaged_shards(folder: Path, manifest: dict, splits: Sequence[str]) -> list[str]:
    """Shard files of these splits that are missing or whose size is not the manifest's."""
    damaged = []
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = Path(folder) / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                damaged.append(shard["file"])
    return damaged


def incomplete_reason(folder: Path, feature_key: str, split_keys: dict[str, str]) -> str | None:
    """Why the store in ``folder`` is not complete for these keys, or None when it is: the
    check behind every skip of extraction (``run``, ``train``, ``status``)."""
    try:
        manifest = read_manifest(folder)
    except StoreError as exc:
        return str(exc)
    if manifest.get("feature_key") != feature_key:
        return f"{Path(folder) / MANIFEST}: features of another config"
    stale = [split for split, key in split_keys.items() if manifest["splits"].get(split, {}).get("key") != key]
    if stale:
        return f"{Path(folder) / MANIFEST}: the data of split(s) {', '.join(stale)} changed since extraction"
    damaged = damaged_shards(folder, manifest, list(split_keys))
    if damaged:
        return f"{folder}: shard file(s) {', '.join(damaged)} missing or truncated"
    return None


# --- reading -------------------------------------------------------------------------------


class _Shards:
    """The shard files of one split; h5py handles are opened lazily, once per process."""

    def __init__(self, folder: Path, split: str, expected_key: str | None):
        manifest = read_manifest(folder)
        if split not in manifest["splits"]:
            raise StoreError(f"{Path(folder) / MANIFEST}: no split {split!r}")
        key = manifest["splits"][split].get("key")
        if expected_key is not None and key != expected_key:
            raise StoreError(f"{Path(folder) / MANIFEST}: the {split} features were extracted with another config "
                             f"or from other data (key {key}, expected {expected_key}); rerun extract")
        if damaged := damaged_shards(folder, manifest, [split]):
            raise StoreError(f"{folder}: shard file(s) {', '.join(damaged)} missing or truncated; rerun extract")
        self.manifest = manifest
        self.paths = [Path(folder) / r["file"] for r in manifest["splits"][split]["shards"]]
        self.counts = [r["num_samples"] for r in manifest["splits"][split]["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(int).tolist()
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def handle(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # a DataLoader worker: never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.paths[shard], "r")
        return self._handles[shard]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class FeatureDataset(Dataset):
    """All shards of one split as one map-style Dataset (random access, ``num_workers > 0`` safe).

    Items are ``{"features": {layer: (C, H, W) float32}, "index", "label", "sample_id",
    "defect_type", "path"}``. The metadata of every sample is read once at construction.
    """

    def __init__(self, folder: Path, split: str, layers: Sequence[str] | None = None,
                 expected_key: str | None = None):
        self._shards = _Shards(Path(folder), split, expected_key)
        self.layers = list(layers) if layers else [layer["name"] for layer in self._shards.manifest["layers"]]
        unknown = set(self.layers) - {layer["name"] for layer in self._shards.manifest["layers"]}
        if unknown:
            raise StoreError(f"{folder}: no features for layers {sorted(unknown)}")
        columns: dict[str, list] = {"label": [], "sample_id": [], "defect_type": [], "path": []}
        for path in self._shards.paths:
            with h5py.File(path, "r") as shard:
                columns["label"].extend(shard["label"][:].tolist())
                for name in ("sample_id", "defect_type", "path"):
                    columns[name].extend(shard[name].asstr()[:].tolist())
        self.labels = np.asarray(columns["label"], dtype=np.int64)
        self.sample_ids: list[str] = columns["sample_id"]
        self.defect_types: list[str] = columns["defect_type"]
        self.paths: list[str] = columns["path"]
        self.manifest = self._shards.manifest

    def __len__(self) -> int:
        return self._shards.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard, local = self._shards.locate(index)
        handle = self._shards.handle(shard)
        return {
            "features": {layer: _to_tensor(handle[f"features/{layer}"][local]) for layer in self.layers},
            "index": index, "label": int(self.labels[index]), "sample_id": self.sample_ids[index],
            "defect_type": self.defect_types[index], "path": self.paths[index],
        }

    def stream(self, batch_size: int) -> FeatureStream:
        return FeatureStream(self, batch_size)


class FeatureStream(IterableDataset):
    """Sequential reading in contiguous blocks of ``batch_size``; shards are divided among
    DataLoader workers (use ``batch_size=None`` in the DataLoader: items are already batches)."""

    def __init__(self, dataset: FeatureDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self) -> Iterator[dict]:
        shards = self.dataset._shards
        worker = get_worker_info()
        mine = range(len(shards.paths)) if worker is None else range(worker.id, len(shards.paths), worker.num_workers)
        for shard in mine:
            handle = shards.handle(shard)
            for lo in range(0, shards.counts[shard], self.batch_size):
                hi = min(lo + self.batch_size, shards.counts[shard])
                first = shards.offsets[shard]
                yield {
                    "features": {layer: _to_tensor(handle[f"features/{layer}"][lo:hi])
                                 for layer in self.dataset.layers},
                    "index": torch.arange(first + lo, first + hi),
                    "label": torch.from_numpy(self.dataset.labels[first + lo:first + hi]),
                }
