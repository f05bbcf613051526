#!/usr/bin/env python3
"""The performance suite: every model's speed, FLOPs and memory against this machine's own limit.

    python benchmarks/run.py [--sections models ratio components training extraction memory]
                             [--rounds 3] [--json FILE]

Everything is measured in this one run on this machine; configurations that are compared are
timed in alternating rounds (the order rotates every round) and medians are reported, because
this machine's speed drifts by up to 40 % within minutes. Timed loops reuse freed memory
(``reused_memory``) as evaluation and extraction do, except the "before this suite's work" mode.
The fp32 peak (the faster of a 2048^2 GEMM and a 3x3 convolution, see ``peak_gflops``) is one of
the alternating measures, so every "% of peak" shares its drift. Weights are random (timing does
not depend on them); memories (PatchCore's bank, PaDiM's Gaussians, SPADE's gallery) are sized
for ``--train-images`` training images.

Sections:
- ``models``: each model at the demo config's sizes (configs/demo.yaml; EfficientAD at 128 px):
  throughput at batch 1 and 8, latency median and p90 at batch 1, FLOPs counted by
  ``torch.utils.flop_counter``, % of the fp32 peak, peak memory of a batch-8 forward (CUDA:
  allocator peak; CPU: resident set sampled every millisecond, above the level before), model.pt size;
- ``ratio``: EfficientAD-AST against EfficientAD-S at the thesis's sizes (configs/mvtec_ad.yaml:
  B5 stage 5 at 768 px, 1024 hidden channels; EfficientAD-S at 256 px) and at the demo's, batch 1
  in three modes and the larger batch in the inference default;
- ``components``: EfficientAD-AST's parts (backbone, flow teacher, student, autoencoder, maps with
  resizing and smoothing) at both sizes, each with its FLOPs and % of the fp32 peak;
- ``training``: one student-AE epoch fed from the HDF5 store against one that computes the
  backbone's features on the fly (equal validation values asked), and the peak RSS of training a
  category (`effad-hpc train`, own process) with 10x the images against 1x;
- ``extraction``: extraction into shards against the bare backbone forward on decoded images;
- ``memory``: PaDiM's and SPADE's fit at paper sizes (WideResNet-50 layers 1-3 at 256 px: 1792
  channels on a 64x64 grid) in their own processes: peak RSS and model.pt size.

At the end, one table lists every target of the performance issue with its measured value.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from effad_hpc.config import load_config, parse_config
from effad_hpc.data import ImageDataset, ensure_dataset, load_category
from effad_hpc.features import build_backbone, extract_category
from effad_hpc.models import AnomalyDetector
from effad_hpc.training import read_record, stage_folder, train
from effad_hpc.training.detector import untrained_detector
from effad_hpc.utils.device import autocast, device_record, resolve_device
from effad_hpc.utils.memory import reused_memory

REPO = Path(__file__).resolve().parents[1]
MODELS = ["efficientad_ast", "ast", "efficientad_s", "efficientad_m", "patchcore", "padim", "spade"]
SECTIONS = ["models", "ratio", "components", "training", "extraction", "memory"]
RANDOM_WEIGHTS = ["backbone.pretrained=false", "patchcore.backbone.pretrained=false",
                  "padim.backbone.pretrained=false", "spade.backbone.pretrained=false"]
MODES = {"plain": "NCHW, eager (before this suite's work)", "channels_last": "NHWC, eager (inference default)",
         "compiled": "NHWC, torch.compile (inference.compile: true)"}
PAPER_PYRAMID = (1792, 64)
"""WideResNet-50 layers 1-3 (256 + 512 + 1024 channels) on layer 1's 64x64 grid at 256 px."""


# --- measuring ---------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def alternate(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measure once per round, the order rotated every round; every measure is run once to
    warm up first. Returns each measure's values over the rounds."""
    for measure in measures.values():
        measure()
    names, values = list(measures), {name: [] for name in measures}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            values[name].append(measures[name]())
    return values


def peak_gflops(device: torch.device, n: int = 2048) -> Callable[[], float]:
    """A measure of the machine's fp32 peak: the faster of an n^3 GEMM (``torch.mm``: MKL or cuBLAS)
    and a 3x3 convolution in NHWC (oneDNN or cuDNN; 256 channels on 64x64, 4.8 GFLOP). Not the GEMM
    alone: on an AMD EPYC, MKL's sgemm ran at 200 GFLOP/s where oneDNN's convolutions ran at 440,
    which put every convolutional model at up to 200 % of a GEMM-only peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.randn(1, 256, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).contiguous(memory_format=torch.channels_last)

    def measure() -> float:
        gemm = 2 * n ** 3 / seconds(lambda: torch.mm(a, b), device)
        with torch.inference_mode():
            conv = 2 * 256 * 256 * 9 * 64 * 64 / seconds(lambda: F.conv2d(x, w, padding=1), device)
        return max(gemm, conv) / 1e9

    return measure


def counted_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


class PeakMemory:
    """Peak memory of a block above the level at its start: the CUDA allocator's peak, or on the
    CPU the resident set size sampled every millisecond by a thread."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start, self._high, self._stop = self._rss(), self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._high, self._rss()) - self._start


def state_bytes(module: torch.nn.Module) -> int:
    """The size model.pt would have: the saved state dict."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


PEAK_MARK = "PEAK_RSS_BYTES"


def own_peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries the
    parent's peak over fork and exec, so a child started from this large process would report
    at least this process's peak."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def child_peak_rss(argv: list[str]) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, output) of ``python -m MODULE ARGS`` (``argv``: MODULE or a
    script's path, then ARGS) in its own process, which reports its VmHWM when it ends."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, __file__, "--peak-of-module", *argv], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"python -m {' '.join(argv)} failed ({run.returncode}):\n{run.stdout[-2000:]}"
                           f"{run.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in run.stderr.splitlines() if line.startswith(PEAK_MARK))
    return peak, time.perf_counter() - start, run.stdout


def run_module_reporting_peak(module: str, args: list[str]) -> None:
    """Run ``python -m MODULE ARGS`` (or a script, for a ``.py`` path) here, then report the peak."""
    import runpy

    sys.argv = [module, *args]
    code = 0
    try:
        if module.endswith(".py"):
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    print(f"{PEAK_MARK} {own_peak_rss()}", file=sys.stderr)
    sys.exit(code)


# --- sections ----------------------------------------------------------------------------------


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device, "auto")
        self.precision = "auto"
        self.results: dict = {"sections": {}}
        self.targets: list[dict] = []
        self.work = Path(tempfile.mkdtemp(prefix="effad-bench-run-"))

    def config(self, name: str, overrides: list[str] = ()):
        return load_config(REPO / "configs" / name, [*RANDOM_WEIGHTS, *overrides, f"run.out_dir={self.work / 'run'}"])

    def target(self, name: str, measured: float, goal: float, unit: str = "", note: str = "") -> None:
        self.targets.append({"target": name, "measured": measured, "goal": goal, "unit": unit,
                             "met": bool(measured <= goal if unit.startswith("<=") else measured >= goal),
                             "note": note})

    def inferring(self, call: Callable[[], object]) -> Callable[[], object]:
        """``call`` as inference runs: inference mode, autocast in the suite's precision."""
        def run():
            with torch.inference_mode(), autocast(self.device, self.precision):
                return call()

        return run

    def forward(self, detector: AnomalyDetector, images: torch.Tensor) -> Callable[[], object]:
        return self.inferring(lambda: detector(images))

    def images(self, size: int, batch: int) -> torch.Tensor:
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)

    # models ---------------------------------------------------------------------------------

    def models(self) -> None:
        config = self.config("demo.yaml")
        measures: dict[str, Callable[[], float]] = {"peak": peak_gflops(self.device)}
        info, latencies = {}, {}  # latencies: every batch-1 call, the warm-up round first
        for model in self.args.models:
            detector = untrained_detector(config, model, self.args.train_images, self.device).optimize(
                config.inference.channels_last, config.inference.compile)  # as evaluation runs it
            size = detector.image_size
            single, batch = self.images(size, 1), self.images(size, self.args.batch)
            with PeakMemory(self.device) as memory:
                self.forward(detector, batch)()
            info[model] = {"image_size": size, "flops_per_image": counted_flops(self.forward(detector, single)),
                           "peak_memory_bytes": memory.peak_bytes, "model_pt_bytes": state_bytes(detector.model)}
            measures[f"{model}/1"] = self._batch1(self.forward(detector, single), latencies.setdefault(model, []))
            measures[f"{model}/{self.args.batch}"] = (lambda d=detector, x=batch: seconds(self.forward(d, x),
                                                                                          self.device))
        with reused_memory():  # as evaluation runs its batches
            values = alternate(measures, self.args.rounds)
        peak = statistics.median(values["peak"])
        rows = []
        for model in self.args.models:
            one = statistics.median(values[f"{model}/1"])
            many = statistics.median(values[f"{model}/{self.args.batch}"]) / self.args.batch
            flops = info[model]["flops_per_image"]
            rows.append({"model": model, **info[model], "images_per_s_batch1": 1 / one,
                         f"images_per_s_batch{self.args.batch}": 1 / many,
                         "latency_ms_median": 1000 * one,
                         "latency_ms_p90": 1000 * float(np.percentile(latencies[model][self.args.repeats:], 90)),
                         "gflop_per_image": flops / 1e9,
                         "percent_of_peak": 100 * flops / many / 1e9 / peak})
        self.results["sections"]["models"] = {"config": "configs/demo.yaml", "peak_gflops": peak, "rows": rows}
        print(f"\n== models (configs/demo.yaml sizes, random weights, memories for {self.args.train_images} "
              f"training images); fp32 peak {peak:.1f} GFLOP/s")
        header = (f"{'model':<17}{'px':>5}{'img/s b1':>10}{f'img/s b{self.args.batch}':>10}{'ms med':>9}"
                  f"{'ms p90':>9}{'GFLOP':>8}{'% peak':>8}{'peak MiB':>10}{'model.pt MiB':>14}")
        print(header + "\n" + "-" * len(header))
        for r in rows:
            print(f"{r['model']:<17}{r['image_size']:>5}{r['images_per_s_batch1']:>10.1f}"
                  f"{r[f'images_per_s_batch{self.args.batch}']:>10.1f}{r['latency_ms_median']:>9.1f}"
                  f"{r['latency_ms_p90']:>9.1f}{r['gflop_per_image']:>8.2f}{r['percent_of_peak']:>8.1f}"
                  f"{r['peak_memory_bytes'] / 2**20:>10.0f}{r['model_pt_bytes'] / 2**20:>14.1f}")

    def _batch1(self, call: Callable[[], object], calls: list[float]) -> Callable[[], float]:
        """A measure: the median of ``--repeats`` batch-1 calls, each call's seconds kept in ``calls``."""
        def measure() -> float:
            times = [seconds(call, self.device) for _ in range(self.args.repeats)]
            calls.extend(times)
            return statistics.median(times)

        return measure

    # ratio and components --------------------------------------------------------------------

    def _pair(self, config_name: str, mode: str = "channels_last") -> tuple[AnomalyDetector, AnomalyDetector]:
        config = self.config(config_name)
        pair = (untrained_detector(config, "efficientad_ast", self.args.train_images, self.device),
                untrained_detector(config, "efficientad_s", self.args.train_images, self.device))
        if mode != "plain":  # plain: the detector as built (NCHW, batch norms unfolded, eager)
            for detector in pair:
                detector.optimize(channels_last=True, compile=mode == "compiled")
        return pair

    def ratio(self) -> None:
        """Per size and mode, the two models alternate; each mode's pair is built alone, so that
        compiled and eager detectors never share the process's caches while they are timed. Batch 1
        in every mode; the larger batch (``--batch``) in the inference default."""
        rows = {}
        runs = [(mode, 1) for mode in MODES] + [("channels_last", self.args.batch)]
        for label, config_name in (("thesis", "mvtec_ad.yaml"), ("demo", "demo.yaml")):
            rows[label] = {}
            print(f"\n== throughput ratio at {label} sizes (the thesis on a V100: EfficientAD-AST 9.11 images/s : "
                  "EfficientAD-S 358 = 0.025)")
            for mode, batch in runs:
                pair = dict(zip(("efficientad_ast", "efficientad_s"), self._pair(config_name, mode)))
                measures = {name: (lambda d=d, x=self.images(d.image_size, batch): seconds(self.forward(d, x),
                                                                                            self.device) / batch)
                            for name, d in pair.items()}
                with nullcontext() if mode == "plain" else reused_memory():
                    values = alternate(measures, self.args.rounds)
                hybrid_s, small_s = (statistics.median(values[name]) for name in pair)
                rows[label][f"{mode}/batch{batch}"] = {"efficientad_ast_images_per_s": 1 / hybrid_s,
                                                       "efficientad_s_images_per_s": 1 / small_s,
                                                       "ratio": small_s / hybrid_s}
                print(f"EfficientAD-AST ({pair['efficientad_ast'].image_size} px) {1 / hybrid_s:.2f} images/s : "
                      f"EfficientAD-S ({pair['efficientad_s'].image_size} px) {1 / small_s:.2f} images/s = "
                      f"{small_s / hybrid_s:.3f}   [{label} sizes, batch {batch}, {MODES[mode]}]")
                del pair, measures
        self.results["sections"]["ratio"] = rows
        thesis = rows["thesis"]
        best = max((run for run in thesis if run.endswith("/batch1")), key=lambda run: thesis[run]["ratio"])
        self.target("EfficientAD-AST : EfficientAD-S throughput, thesis sizes, batch 1", thesis[best]["ratio"], 0.25,
                    ">=", f"both {MODES[best.split('/')[0]]}; arithmetic limit about 0.35; thesis 1/39")
        batched = f"channels_last/batch{self.args.batch}"
        self.target(f"same, batch {self.args.batch}", thesis[batched]["ratio"], 0.25, ">=",
                    f"both {MODES['channels_last']}")

    def components(self) -> None:
        section = {}
        for label, config_name in (("thesis", "mvtec_ad.yaml"), ("demo", "demo.yaml")):
            hybrid, small = self._pair(config_name)
            model = hybrid.model
            images = self.images(hybrid.image_size, 1)
            with torch.inference_mode():
                features = hybrid.model_inputs(images)
                inputs = model.teacher.with_positions(features)
                z, student = model.teacher(features)[0], model.student(inputs)
                reconstruction = model.autoencoder(inputs)
            size, channels = (hybrid.image_size, hybrid.image_size), features.shape[1]

            def maps():  # what EfficientADAST.maps adds to its networks' outputs, then the detector's resizing
                st = (z - student[:, :channels]).pow(2).mean(dim=1)
                ae = (reconstruction - student[:, channels:]).pow(2).mean(dim=1)
                return hybrid.to_size({"combined": 0.5 * st + 0.5 * ae}, size)

            small_images = self.images(small.image_size, 1)
            part = self.inferring
            parts = {
                "backbone": part(lambda: hybrid.model_inputs(images)),
                "flow teacher": part(lambda: model.teacher(features)),
                "student": part(lambda: model.student(inputs)),
                "autoencoder": part(lambda: model.autoencoder(inputs)),
                "maps, resize, smoothing": part(maps),
                "whole detector": part(lambda: hybrid(images)),
                "efficientad_s": part(lambda: small(small_images)),
            }
            flops = {name: counted_flops(call) for name, call in parts.items()}
            with reused_memory():
                values = alternate({"peak": peak_gflops(self.device),
                                    **{name: (lambda c=call: seconds(c, self.device)) for name, call in parts.items()}},
                                   self.args.rounds)
            peak = statistics.median(values["peak"])
            rows = []
            for name in parts:
                t = statistics.median(values[name])
                rows.append({"part": name, "ms": 1000 * t, "gflop": flops[name] / 1e9,
                             "percent_of_peak": 100 * flops[name] / t / 1e9 / peak})
            section[label] = {"peak_gflops": peak, "rows": rows}
            total = next(r["ms"] for r in rows if r["part"] == "whole detector")
            print(f"\n== EfficientAD-AST components, {label} sizes ({hybrid.image_size} px, {channels} ch on "
                  f"{features.shape[-1]}x{features.shape[-1]}; NHWC, eager); fp32 peak {peak:.1f} GFLOP/s")
            header = f"{'part':<26}{'ms':>9}{'share':>8}{'GFLOP':>9}{'% peak':>8}"
            print(header + "\n" + "-" * len(header))
            for r in rows:
                print(f"{r['part']:<26}{r['ms']:>9.1f}{r['ms'] / total:>8.2f}{r['gflop']:>9.2f}"
                      f"{r['percent_of_peak']:>8.1f}")
        self.results["sections"]["components"] = section
        thesis = {r["part"]: r for r in section["thesis"]["rows"]}
        self.target("EfficientAD-S forward, % of fp32 peak", thesis["efficientad_s"]["percent_of_peak"],
                    85, ">= %", "256 px, NHWC, eager")
        self.target("hybrid student convolutions, % of fp32 peak (thesis sizes)",
                    thesis["student"]["percent_of_peak"], 70, ">= %")
        self.target("hybrid flow teacher, % of fp32 peak (thesis sizes)",
                    thesis["flow teacher"]["percent_of_peak"], 70, ">= %")

    # training --------------------------------------------------------------------------------

    def _training_config(self, root: Path, out: Path, train_images: int, size: int, extra: list[str] = ()):
        raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        raw["data"] |= {"root": str(root), "categories": ["washer"], "image_size": size,
                        "synthetic": {"seed": 0, "size": size, "num_train": train_images, "num_test_good": 4,
                                      "num_test_per_defect": 2}}
        raw["models"] = ["efficientad_ast"]
        raw["run"] = {"out_dir": str(out), "device": self.args.device}
        for section in ("teacher", "student"):
            raw[section]["epochs"] = 1
        path = out.parent / f"{out.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw))
        return path, load_config(path, list(extra))

    def training(self) -> None:
        # (1) one student-AE epoch: stored features against the backbone on the fly (float32 store: equal inputs)
        path, stored = self._training_config(self.work / "data_epoch", self.work / "epoch", self.args.epoch_images,
                                             256, ["features.dtype=float32"])
        live = load_config(path, ["features.dtype=float32", "student.feature_source=on_the_fly"])
        ensure_dataset(stored)
        train(stored, "efficientad_ast", "washer", show_progress=False)  # extraction and teacher, once
        records = {}

        def epoch(config) -> Callable[[], float]:
            def run() -> float:
                shutil.rmtree(stage_folder(config, "washer", "student_ae"), ignore_errors=True)
                train(config, "efficientad_ast", "washer", show_progress=False)
                record = read_record(stage_folder(config, "washer", "student_ae"))
                records.setdefault(config.student.feature_source, []).append(record.best_validation)
                return record.train_seconds
            return run

        values = alternate({"stored": epoch(stored), "on_the_fly": epoch(live)}, max(2, self.args.rounds - 1))
        hdf5, computed = statistics.median(values["stored"]), statistics.median(values["on_the_fly"])
        difference = abs(records["stored"][-1] - records["on_the_fly"][-1]) / abs(records["on_the_fly"][-1])
        # (2) peak RSS of training one category with 1x and 10x the images, each in its own process
        rss = {}
        for factor in (1, 10):
            images = self.args.rss_images * factor
            path, config = self._training_config(self.work / f"data_rss{factor}", self.work / f"rss{factor}", images,
                                                 128)
            ensure_dataset(config)  # generated here: the child's peak is training's alone
            peak, wall, _ = child_peak_rss(["effad_hpc", "train", "--config", str(path), "--quiet"])
            rss[factor] = {"train_images": images, "peak_rss_bytes": peak, "seconds": wall}
        growth = rss[10]["peak_rss_bytes"] / rss[1]["peak_rss_bytes"]
        self.results["sections"]["training"] = {
            "student_ae_epoch": {"images": self.args.epoch_images, "stored_s": hdf5, "on_the_fly_s": computed,
                                 "speedup": computed / hdf5, "validation_relative_difference": difference,
                                 "validation": records},
            "peak_rss": rss, "rss_growth_10x": growth}
        print(f"\n== training (configs/demo.yaml sizes, {self.args.epoch_images} training images, float32 store)")
        print(f"student-AE epoch: HDF5-fed {hdf5:.2f} s, backbone on the fly {computed:.2f} s: {computed / hdf5:.2f}x; "
              f"validation values differ by {difference:.1e} (relative)")
        for factor, r in rss.items():
            print(f"train one category, {r['train_images']:>5} images at 128 px: peak RSS "
                  f"{r['peak_rss_bytes'] / 2**20:.0f} MiB ({r['seconds']:.0f} s)")
        print(f"peak RSS at 10x the images / at 1x: {growth:.2f}")
        self.target("student-AE epoch, HDF5-fed / on the fly (speed-up)", computed / hdf5, 10, ">= x",
                    f"validation values equal within {difference:.0e}")
        self.target("training peak RSS, 10x images / 1x", growth, 1.2, "<= x")

    # extraction ------------------------------------------------------------------------------

    def extraction(self) -> None:
        raw = {"name": "bench", "run": {"out_dir": str(self.work / "extract"), "device": self.args.device},
               "data": {"layout": "mvtec_ad", "root": str(self.work / "data_extract"), "categories": ["washer"],
                        "image_size": 256, "synthetic": {"size": 256, "num_train": self.args.extract_images,
                                                         "num_test_good": 4, "num_test_per_defect": 2}},
               "features": {"batch_size": 8, "shards": 2}}
        config = parse_config(raw, "benchmark")
        data = load_category(config, "washer")
        samples = [s for split in ("train", "validation", "test") for s in data.samples(split)]
        dataset = ImageDataset(samples, 256)
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        # the backbone as extraction runs it (folded batch norms, NHWC): the ratio is what the stage adds
        extractor = build_backbone(config.backbone).extractor.to(self.device).optimize(config.inference.channels_last)

        def bare() -> float:
            def run():  # reusing freed memory as extraction does
                with reused_memory(), torch.inference_mode(), autocast(self.device, self.precision):
                    for lo in range(0, len(images), 8):
                        extractor(images[lo:lo + 8].to(self.device))
            return len(images) / seconds(run, self.device)

        def extract() -> float:
            shutil.rmtree(self.work / "extract", ignore_errors=True)
            start = time.perf_counter()
            extract_category(config, "washer", show_progress=False)
            return len(samples) / (time.perf_counter() - start)

        values = alternate({"bare": bare, "extract": extract}, self.args.rounds)
        ratios = [e / b for e, b in zip(values["extract"], values["bare"])]
        ratio = statistics.median(ratios)
        self.results["sections"]["extraction"] = {"images": len(samples), "bare_images_per_s": values["bare"],
                                                  "extract_images_per_s": values["extract"], "ratio": ratio}
        print(f"\n== extraction ({len(samples)} images at 256 px, {config.backbone.name} {config.backbone.layers}, "
              f"float16 lzf, 2 shards)")
        print(f"bare backbone forward {statistics.median(values['bare']):.1f} images/s, extraction into shards "
              f"{statistics.median(values['extract']):.1f} images/s: ratio {ratio:.2f} (per round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
        self.target("extraction / bare backbone forward", ratio, 0.9, ">=")

    # memory ----------------------------------------------------------------------------------

    def memory(self) -> None:
        rows = []
        for model in ("padim", "spade"):
            peak, wall, output = child_peak_rss([__file__, "--fit-child", model,
                                                 "--train-images", str(self.args.paper_images)])
            child = json.loads(output.strip().splitlines()[-1])
            rows.append({"model": model, "peak_rss_bytes": peak, "seconds": wall, **child})
        self.results["sections"]["memory"] = {"rows": rows}
        print(f"\n== fit at paper sizes ({self.args.paper_images} images, WideResNet-50 layers 1-3 at 256 px: "
              f"{PAPER_PYRAMID[0]} channels on {PAPER_PYRAMID[1]}x{PAPER_PYRAMID[1]}; random features)")
        for r in rows:
            print(f"{r['model']:<8} fit {r['seconds']:.0f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"model.pt {r['model_pt_bytes'] / 2**30:.2f} GiB ({r['what']})")
            self.target(f"{r['model']} fit at paper sizes, peak RSS", r["peak_rss_bytes"] / 2**30, 8, "<= GiB")

    # report ----------------------------------------------------------------------------------

    def report(self) -> None:
        print("\n== targets (measured in this run)")
        header = f"{'target':<62}{'measured':>10}  {'goal':<12}{'met':<5}note"
        print(header + "\n" + "-" * len(header))
        for t in self.targets:
            goal = f"{t['unit'].split()[0]} {t['goal']:g} {' '.join(t['unit'].split()[1:])}".strip()
            print(f"{t['target']:<62}{t['measured']:>10.3g}  {goal:<12}{'yes' if t['met'] else 'no':<5}{t['note']}")
        self.results |= {"targets": self.targets, "machine": machine(self.device, self.precision),
                         "rounds": self.args.rounds}
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.results, indent=2) + "\n")
            print(f"\nwrote {self.args.json}")


def machine(device: torch.device, precision: str) -> dict:
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            **device_record(device, precision)}


def fit_child(model: str, train_images: int) -> None:
    """Fit PaDiM or SPADE on random features of the paper's pyramid, batch by batch, as the
    training stage streams them; print the model's size as JSON."""
    from effad_hpc.models.padim import PaDiM
    from effad_hpc.models.spade import SPADE

    channels, side = PAPER_PYRAMID
    generator = torch.Generator().manual_seed(0)

    def batches():
        for lo in range(0, train_images, 8):
            yield torch.randn(min(8, train_images - lo), channels, side, side, generator=generator)

    if model == "padim":
        fitted, what = PaDiM.fit(batches(), dims=550), "550 of 1792 channels, 4096 Gaussians"
    else:
        fitted, what = SPADE.fit(batches(), image_neighbors=50), "float16 gallery"
    print(json.dumps({"model_pt_bytes": sum(t.numel() * t.element_size() for t in fitted.state_dict().values()),
                      "what": what}))


def main() -> None:
    if sys.argv[1:2] == ["--peak-of-module"]:
        run_module_reporting_peak(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="batch-1 calls per round (latency percentiles)")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch")
    parser.add_argument("--train-images", type=int, default=200, help="training images the memories are sized for")
    parser.add_argument("--epoch-images", type=int, default=40, help="training images of the epoch comparison")
    parser.add_argument("--rss-images", type=int, default=40, help="training images of the 1x RSS run")
    parser.add_argument("--extract-images", type=int, default=200,
                        help="training images of the extraction comparison (MVTec AD: 60-391, median 240; "
                             "a job's fixed start, about 0.2 s, weighs as in a real category)")
    parser.add_argument("--paper-images", type=int, default=209,
                        help="training images of the paper-size fits (MVTec AD bottle's training split)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "benchmarks" / "run.json")
    parser.add_argument("--fit-child", choices=["padim", "spade"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fit_child:
        fit_child(args.fit_child, args.train_images)
        return
    suite = Suite(args)
    print(json.dumps(machine(suite.device, suite.precision)))
    try:
        for section in SECTIONS:
            if section in args.sections:
                getattr(suite, section)()
        suite.report()
    finally:
        shutil.rmtree(suite.work, ignore_errors=True)


if __name__ == "__main__":
    main()
