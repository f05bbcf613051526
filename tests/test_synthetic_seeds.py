"""The synthetic generator works for every seed and supported size, and ``effad-hpc synth`` names bad input."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effad_hpc.config import SyntheticConfig, parse_config
from effad_hpc.data import list_categories, read_category
from effad_hpc.data.synthetic import AD_CATEGORIES, LOCO_CATEGORIES, _rng_factory, generate, loco
from effad_hpc.errors import ConfigError
from tests.conftest import REPO, tiny_config_dict

SMALLEST_SIZE = 32
LAYOUTS = {"ad": ("mvtec_ad", AD_CATEGORIES), "loco": ("mvtec_loco", LOCO_CATEGORIES)}


def _files(root: Path) -> dict[Path, bytes]:
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _check_readable(root: Path, layout: str, size: int) -> None:
    reader, categories = LAYOUTS[layout]
    assert list_categories(root) == sorted(categories)
    for name in categories:
        data = read_category(root / name, reader)
        defective = [s for s in data.samples("test") if s.label]
        assert defective and len(defective) < len(data.samples("test"))
        for sample in defective:
            regions = data.ground_truth(sample)
            assert regions and all(region.mask.any() for region in regions), sample.path  # no unseen defect
        assert Image.open(data.samples("train")[0].path).size[1] == size


@pytest.mark.parametrize("size, seeds", [(SMALLEST_SIZE, range(16)), (64, range(16)), (128, range(4)),
                                         (256, range(2))])
def test_every_seed_and_size_generates_a_readable_deterministic_layout(size, seeds, tmp_path):
    for seed in seeds:
        options = SyntheticConfig(seed=seed, size=size, num_train=2, num_validation=1, num_test_good=1,
                                  num_test_per_defect=1)
        for layout in LAYOUTS:
            first, second = tmp_path / f"{layout}-{seed}-a", tmp_path / f"{layout}-{seed}-b"
            generate(layout, first, None, options)
            generate(layout, second, None, options)
            _check_readable(first, layout, size)
            assert _files(first) == _files(second), f"{layout} seed {seed} size {size}"


def test_a_defect_drawn_outside_the_image_is_drawn_again(tmp_path):
    # seed 70's first fabric contamination starts on the top row and its specks all fall outside
    generate("ad", tmp_path, ["fabric"], SyntheticConfig(seed=70, size=128, num_train=2, num_test_good=1,
                                                         num_test_per_defect=1))
    mask = np.asarray(Image.open(tmp_path / "fabric" / "ground_truth" / "contamination" / "000_mask.png"))
    assert mask.any()


def test_tray_anomalies_that_need_free_space_always_find_a_scene():
    # About a third of the "extra_part" and a sixth of the "misplaced_part" draws have no room
    # in the first scene (an extra bolt never fits beside the bolt): these take the retry path.
    category = loco.LOCO_CATEGORIES["parts_tray"]
    normal = sum(c.count for c in loco.TRAY_COMPARTMENTS)
    for index in range(150):
        for defect, count in (("extra_part", normal + 1), ("misplaced_part", normal)):
            layout = loco.scene(category, np.random.default_rng([7, index]), defect)
            assert len(layout.parts) == count and [name for name, _ in layout.regions] == [defect]
            for i, a in enumerate(layout.parts):  # the same clearance as every normal scene
                for b in layout.parts[i + 1:]:
                    assert math.hypot((a.x - b.x) * loco.ASPECT, a.y - b.y) > (a.radius + b.radius) * 1.1


def test_scenes_stay_as_they_were_when_they_fit_at_once():
    # seed 0's first "extra_part" scene fits without a retry: data sets made before the retry keep their images
    rng_for = _rng_factory(0, "parts_tray")
    rng = rng_for("test_extra_part", 0)
    category = loco.LOCO_CATEGORIES["parts_tray"]
    layout = category.layout(rng)
    category.break_rule("extra_part", layout, rng)
    assert loco.scene(category, rng_for("test_extra_part", 0), "extra_part") == layout


def test_size_below_the_smallest_supported_is_a_config_error(tmp_path):
    SyntheticConfig(size=SMALLEST_SIZE)
    raw = tiny_config_dict(tmp_path / "data", tmp_path / "run")
    raw["data"]["synthetic"] = {"size": SMALLEST_SIZE - 1}
    with pytest.raises(ConfigError, match=r"data\.synthetic\.size: .*greater than or equal to 32 \(got 31\)"):
        parse_config(raw, "tiny config")


# --- effad-hpc synth as a user runs it -------------------------------------------------------------


def _synth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effad_hpc", "synth", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("effad-hpc: error: "), out.stderr
    return lines[0].removeprefix("effad-hpc: error: ")


def test_bad_numbers_name_the_option_and_write_nothing(tmp_path):
    out_dir = tmp_path / "data"
    for option, value, rule in (("--size", "0", "must be greater than or equal to 32"),
                                ("--size", "-5", "must be greater than or equal to 32"),
                                ("--num-train", "0", "must be greater than 0")):
        message = _one_line_error(_synth("--layout", "ad", "--out", str(out_dir), option, value))
        assert message == f"{option} {value}: {rule}"
    assert not out_dir.exists()


def test_out_in_the_way_names_the_path(tmp_path):
    blocker = tmp_path / "data.txt"
    blocker.write_text("not a folder\n")
    message = _one_line_error(_synth("--layout", "ad", "--out", str(blocker)))
    assert message.startswith(f"{blocker}: ") and "not a folder" in message
    message = _one_line_error(_synth("--layout", "loco", "--out", str(blocker / "below")))
    assert message.startswith(f"{blocker / 'below'}: ") and f"{blocker} is not a folder" in message
    assert blocker.read_text() == "not a folder\n"


def test_existing_categories_are_reported_left_unchanged(tmp_path):
    small = ["--size", str(SMALLEST_SIZE), "--num-train", "2", "--num-test-good", "1", "--num-test-per-defect", "1"]
    first = _synth("--layout", "ad", "--out", str(tmp_path), "--categories", "fabric", *small)
    assert first.returncode == 0, first.stderr
    assert "wrote categories fabric" in first.stdout and "left unchanged" not in first.stdout
    before = _files(tmp_path / "fabric")

    again = _synth("--layout", "ad", "--out", str(tmp_path), "--categories", "fabric", "grid", "--seed", "9", *small)
    assert again.returncode == 0, again.stderr
    assert f"fabric: already present, left unchanged: {tmp_path.resolve() / 'fabric'}" in again.stdout
    assert "wrote categories grid:" in again.stdout and "fabric" not in again.stdout.splitlines()[-1]
    assert _files(tmp_path / "fabric") == before
    read_category(tmp_path / "grid", "mvtec_ad")
