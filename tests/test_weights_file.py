"""A backbone.weights_path that is no weights-only state dict is a WeightsError naming the file."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from effad_hpc.config import BackboneConfig
from effad_hpc.errors import WeightsError
from effad_hpc.features.weights import load_pretrained


def load_from(path) -> nn.Module:
    """A small model with ``path`` as its weights_path; the loader does not care about the model."""
    model = nn.Linear(4, 2)
    load_pretrained(model, BackboneConfig(weights_path=path))
    return model


def test_a_state_dict_loads(tmp_path):
    reference = nn.Linear(4, 2)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "wrapped.pth")
    assert torch.equal(load_from(tmp_path / "wrapped.pth").weight, reference.weight)


@pytest.mark.parametrize("pickled", ["module", "optimizer"])
def test_a_pickled_object_is_not_a_state_dict(tmp_path, pickled):
    module = nn.Linear(4, 2)
    torch.save(module if pickled == "module" else torch.optim.SGD(module.parameters(), lr=0.1), tmp_path / "w.pth")
    with pytest.raises(WeightsError) as err:
        load_from(tmp_path / "w.pth")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'w.pth'}: not a weights-only state dict")
    assert "torch.save(model.state_dict(), path)" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_a_list_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"w.pth: holds a list, not a state dict; save one with torch.save"):
        load_from(tmp_path / "w.pth")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_file_names_itself(tmp_path, damage):
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "w.pth")
    whole = (tmp_path / "w.pth").read_bytes()
    damaged = {"truncated": whole[: len(whole) // 2], "empty": b"", "garbage": b"not a checkpoint at all"}[damage]
    (tmp_path / "w.pth").write_bytes(damaged)
    # garbage is no pickle at all, which torch cannot tell from a pickle of forbidden objects
    expected = "not a weights-only state dict" if damage == "garbage" else "unreadable or truncated PyTorch file"
    with pytest.raises(WeightsError, match=rf"^{tmp_path / 'w.pth'}: {expected}"):
        load_from(tmp_path / "w.pth")


def test_a_truncated_safetensors_file_names_itself(tmp_path):
    save_file(nn.Linear(4, 2).state_dict(), tmp_path / "w.safetensors")
    whole = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(whole[:-8])
    with pytest.raises(WeightsError, match=rf"^{tmp_path / 'w.safetensors'}: unreadable or truncated safetensors"):
        load_from(tmp_path / "w.safetensors")
