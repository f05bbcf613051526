"""GPU decisions that need no GPU: precision per compute capability, the build's architectures
against the GPU's, one local chain per GPU, and the DGX-1 profile against the node it describes."""

from __future__ import annotations

import pytest
import torch

from effad_hpc.config import load_config
from effad_hpc.errors import ConfigError
from effad_hpc.hpc.profiles import load_profile
from effad_hpc.hpc.submit import local_chain_gpus
from effad_hpc.utils.device import (
    V100_INSTALL,
    build_runs_on,
    check_build_architectures,
    precision_dtype,
    resolve_device,
)

from tests.conftest import REPO

V100, T4, A100, H100 = (7, 0), (7, 5), (8, 0), (9, 0)
CU130_BUILD = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # the default install's torch
CU126_BUILD = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(("capability", "dtype"), [(V100, torch.float16), (T4, torch.float16),
                                                   (A100, torch.bfloat16), (H100, torch.bfloat16)])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(capability, dtype):
    assert precision_dtype("auto", capability) == dtype


def test_auto_precision_on_the_cpu_is_float32_and_half_precisions_are_refused():
    assert precision_dtype("auto", None) == precision_dtype("fp32", None) == torch.float32
    for half in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match=f"run.precision: {half} needs a CUDA device"):
            precision_dtype(half, None)


def test_forced_precisions_and_bf16_refused_below_ampere():
    assert precision_dtype("fp32", V100) == torch.float32
    assert precision_dtype("fp16", H100) == torch.float16
    assert precision_dtype("bf16", A100) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"bf16 needs compute capability 8.0 or newer, and Tesla V100 has 7.0"):
        precision_dtype("bf16", V100, "Tesla V100")


def test_a_config_asking_for_fp16_fails_at_device_choice_on_the_cpu():
    config = load_config(REPO / "configs" / "demo.yaml", ["run.precision=fp16", "run.device=cpu"])
    with pytest.raises(ConfigError, match="run.precision: fp16 needs a CUDA device"):
        resolve_device(config.run.device, config.run.precision)
    with pytest.raises(ConfigError, match="run.precision"):
        load_config(REPO / "configs" / "demo.yaml", ["run.precision=half"])


def test_the_default_build_has_no_volta_kernels_and_the_cu126_build_has():
    assert not build_runs_on(V100, CU130_BUILD)
    assert build_runs_on(V100, CU126_BUILD)
    assert build_runs_on((8, 6), CU130_BUILD) and build_runs_on((8, 9), CU130_BUILD)  # sm_86 cubins on 8.9
    assert not build_runs_on((6, 1), CU130_BUILD)
    assert build_runs_on((10, 3), ["sm_75", "compute_90"])  # PTX is compiled for any newer GPU
    assert not build_runs_on((8, 0), ["compute_90"])


def test_an_architecture_mismatch_is_one_line_naming_gpu_capability_build_and_install():
    with pytest.raises(ConfigError) as caught:
        check_build_architectures("Tesla V100-SXM2-16GB", V100, CU130_BUILD)
    message = str(caught.value)
    assert "\n" not in message
    for part in ("Tesla V100-SXM2-16GB", "compute capability 7.0", "sm_75, sm_80", V100_INSTALL):
        assert part in message
    check_build_architectures("NVIDIA H100", H100, CU130_BUILD)  # passes
    check_build_architectures("source build", V100, [])  # a build that names no architectures: trusted


def test_this_install_reports_its_architectures():
    """The check reads the real build's list; a CUDA wheel always names its architectures."""
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build has no CUDA architectures")
    assert torch.cuda.get_arch_list(), "a CUDA build of torch that lists no architectures"


def test_local_runs_one_chain_per_gpu_and_fill_the_cores_without():
    eight = [str(i) for i in range(8)]
    assert local_chain_gpus("local", 15, 8, eight) == eight  # one stage process per GPU, not per core slot
    assert local_chain_gpus("local", 3, 8, eight) == ["0", "1", "2"]
    assert local_chain_gpus("local", 2, 8, ["GPU-1a2b", "GPU-3c4d"]) == ["GPU-1a2b", "GPU-3c4d"]
    assert local_chain_gpus("local", 5, 2, []) == [None, None]  # CPU: as many as the cores hold
    assert local_chain_gpus("local", 5, 0, []) == [None]
    assert local_chain_gpus("debug", 3, 2, eight) == [None] * 3  # in this process, on its own devices


def test_the_dgx_profile_fits_a_dgx1_node():
    """8 V100 GPUs, 40 cores and 512 GB per node: one GPU per stage job, 8 jobs of an array at once."""
    profile = load_profile(REPO / "slurm" / "profiles" / "dgx_v100.yaml")
    for stage in ("extract", "teacher", "student_ae", "distill_s", "efficientad_s", "fit", "evaluate"):
        resources = profile.for_stage(stage)
        assert resources.gres == "gpu:1", stage
        assert profile.array_parallelism * resources.cpus_per_task <= 40
        assert profile.array_parallelism * resources.mem_gb <= 512
    assert profile.array_parallelism == 8
    sweep = profile.for_stage("sweep")
    assert (sweep.gres, sweep.cpus_per_task) == ("gpu:8", 40) and sweep.mem_gb <= 512


def test_the_old_mixed_precision_key_names_its_replacement():
    with pytest.raises(ConfigError, match="run.mixed_precision: unknown key; it became run.precision"):
        load_config(REPO / "configs" / "demo.yaml", ["run.mixed_precision=false"])
