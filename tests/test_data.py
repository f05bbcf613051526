import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effad_hpc.data import ImageDataset, list_categories, read_category
from effad_hpc.data.images import read_rgb
from effad_hpc.data.synthetic import AD_CATEGORIES, LOCO_CATEGORIES, generate
from effad_hpc.errors import DataError
from tests.conftest import SMALL


def test_ad_round_trip(synthetic_ad):
    assert list_categories(synthetic_ad) == ["fabric", "grid", "washer"]
    data = read_category(synthetic_ad / "washer", "mvtec_ad", validation_fraction=0.25, seed=0)
    train, validation, test = data.samples("train"), data.samples("validation"), data.samples("test")
    assert len(train) + len(validation) == SMALL.num_train and len(validation) == 2
    assert {s.path for s in train}.isdisjoint({s.path for s in validation})
    defects = {s.defect_type for s in test} - {"good"}
    assert defects == {"scratch", "crack", "missing_piece", "contamination"}
    assert sum(s.label == 0 for s in test) == SMALL.num_test_good
    for sample in test:
        mask = data.union_mask(sample)
        image = np.asarray(read_rgb(sample.path))
        assert mask.shape == image.shape[:2]
        assert mask.any() == bool(sample.label)


def test_ad_masks_mark_the_changed_pixels(synthetic_ad):
    """Defects are drawn where the masks say: inside the mask the image differs from a normal one
    far more than outside it (normal variation is lighting and noise only)."""
    data = read_category(synthetic_ad / "fabric", "mvtec_ad")
    for sample in [s for s in data.samples("test") if s.label]:
        image = np.asarray(read_rgb(sample.path), dtype=np.float32)
        mask = data.union_mask(sample)
        assert 0 < mask.mean() < 0.3
        # local contrast: defect pixels stand out from the median colour of the image
        deviation = np.abs(image - np.median(image.reshape(-1, 3), axis=0)).sum(axis=2)
        assert deviation[mask].mean() > deviation[~mask].mean()


def test_validation_split_is_seeded(synthetic_ad):
    a = read_category(synthetic_ad / "grid", "mvtec_ad", 0.25, seed=0).samples("validation")
    b = read_category(synthetic_ad / "grid", "mvtec_ad", 0.25, seed=0).samples("validation")
    c = read_category(synthetic_ad / "grid", "mvtec_ad", 0.25, seed=5).samples("validation")
    assert [s.path for s in a] == [s.path for s in b]
    assert [s.path for s in a] != [s.path for s in c]


def test_grayscale_images_become_rgb(synthetic_ad):
    data = read_category(synthetic_ad / "grid", "mvtec_ad")
    path = data.samples("train")[0].path
    assert Image.open(path).mode == "L"
    item = ImageDataset(data.samples("train"), 48)[0]
    assert item["image"].shape == (3, 48, 48)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0


def test_loco_round_trip_keeps_every_region(synthetic_loco):
    assert list_categories(synthetic_loco) == sorted(LOCO_CATEGORIES)
    data = read_category(synthetic_loco / "pin_board", "mvtec_loco")
    assert len(data.samples("validation")) == SMALL.num_validation
    names = {spec.defect_name for spec in data.defects.values()}
    assert {"missing_part", "swapped_pins", "scratch"} <= names
    kinds = {s.defect_type for s in data.samples("test")}
    assert kinds == {"good", "logical_anomalies", "structural_anomalies"}
    width, height = Image.open(data.samples("train")[0].path).size
    assert width > height  # LOCO images are not square

    swapped = 0
    for sample in [s for s in data.samples("test") if s.label]:
        regions = data.ground_truth(sample)
        assert regions and all(r.mask.shape == (height, width) and r.mask.any() for r in regions)
        assert all(r.spec is not None and r.spec.defect_name == r.defect_name for r in regions)
        if regions[0].defect_name == "swapped_pins":
            assert len(regions) == 2  # the two swapped pins are two regions, not merged
            swapped += 1
    assert swapped == SMALL.num_test_per_defect
    saturations = {spec.defect_name: spec for spec in data.defects.values()}
    assert saturations["missing_part"].relative_saturation is False
    assert saturations["missing_part"].saturation_threshold > 1
    assert saturations["scratch"].relative_saturation is True


def test_generator_is_deterministic_and_seeded(tmp_path):
    for seed, folder in ((1, "a"), (1, "b"), (2, "c")):
        generate("ad", tmp_path / folder, ["wood"], SMALL.model_copy(update={"seed": seed}))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files]
    other = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in files]
    assert all(same) and not any(other)
    # normal images vary naturally: no two training images are alike
    good = sorted((tmp_path / "a" / "wood" / "train" / "good").glob("*.png"))
    train = [np.asarray(Image.open(p), dtype=np.float32) for p in good]
    assert min(np.abs(a - b).mean() for i, a in enumerate(train) for b in train[i + 1:]) > 2.0


def test_every_ad_category_generates(tmp_path):
    generate("ad", tmp_path, None,
             SMALL.model_copy(update={"num_train": 2, "num_test_good": 1, "num_test_per_defect": 1}))
    for name in AD_CATEGORIES:
        data = read_category(tmp_path / name, "mvtec_ad")
        assert any(s.label for s in data.samples("test"))


# --- bad input: each error names what is wrong --------------------------------------------------


@pytest.fixture
def ad_copy(synthetic_ad, tmp_path) -> Path:
    target = tmp_path / "washer"
    shutil.copytree(synthetic_ad / "washer", target)
    return target


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="missing folder"):
        read_category(tmp_path / "nothing", "mvtec_ad")


def test_empty_category(ad_copy):
    for image in (ad_copy / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"train/good: empty category"):
        read_category(ad_copy, "mvtec_ad")


def test_truncated_image_names_the_file(ad_copy):
    victim = ad_copy / "train" / "good" / "000.png"
    victim.write_bytes(victim.read_bytes()[:200])
    data = read_category(ad_copy, "mvtec_ad", 0.25)
    sample = next(s for s in data.samples("train") + data.samples("validation") if s.path == victim)
    with pytest.raises(DataError, match=f"{victim}: unreadable or truncated image"):
        read_rgb(sample.path)


def test_unreadable_image_names_the_file(ad_copy):
    victim = ad_copy / "test" / "good" / "000.png"
    victim.write_bytes(b"not an image at all")
    data = read_category(ad_copy, "mvtec_ad")
    with pytest.raises(DataError, match=str(victim)):
        ImageDataset(data.samples("test"), 32)[[s.path for s in data.samples("test")].index(victim)]


def test_mask_of_wrong_size(ad_copy):
    mask = ad_copy / "ground_truth" / "crack" / "000_mask.png"
    Image.open(mask).resize((10, 12)).save(mask)
    with pytest.raises(DataError, match=r"000_mask.png: mask size \(10, 12\) differs from its image"):
        read_category(ad_copy, "mvtec_ad")


def test_defective_image_without_mask(ad_copy):
    (ad_copy / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"scratch/001.png: defective test image without a mask"):
        read_category(ad_copy, "mvtec_ad")


def test_loco_unknown_pixel_value_and_missing_config(synthetic_loco, tmp_path):
    target = tmp_path / "parts_tray"
    shutil.copytree(synthetic_loco / "parts_tray", target)
    entries = json.loads((target / "defects_config.json").read_text())
    (target / "defects_config.json").write_text(json.dumps(entries[1:]))  # drop pixel value 255
    data = read_category(target, "mvtec_loco")
    missing = next(s for s in data.samples("test")
                   if s.label and 255 in np.unique(np.asarray(Image.open(s.mask_paths[0]))))
    with pytest.raises(DataError, match="pixel value 255 is not listed"):
        data.ground_truth(missing)
    (target / "defects_config.json").unlink()
    with pytest.raises(DataError, match="defects_config.json: missing"):
        read_category(target, "mvtec_loco")


def test_loco_structural_image_without_masks(synthetic_loco, tmp_path):
    target = tmp_path / "pin_board"
    shutil.copytree(synthetic_loco / "pin_board", target)
    shutil.rmtree(target / "ground_truth" / "structural_anomalies" / "000")
    with pytest.raises(DataError, match="structural_anomalies/000.png: defective test image without a mask"):
        read_category(target, "mvtec_loco")


def test_a_polling_process_sees_a_replaced_image_and_one_table_walks_each_folder_once(tmp_path):
    """Fingerprints are reused only inside one `reused_fingerprints` block (one status table, one
    submission); a later look, even a second later in the same process, sees the replaced file."""
    from effad_hpc.data import fingerprint

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    before = fingerprint.folder_fingerprint(folder)
    Image.new("RGB", (9, 9), "white").save(folder / "a.png")  # replaced in place: same name, new size
    assert fingerprint.folder_fingerprint(folder) != before

    walks = []
    real = fingerprint._image_files
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fingerprint, "_image_files", lambda *args: walks.append(args) or real(*args))
        with fingerprint.reused_fingerprints():
            first = fingerprint.folder_fingerprint(folder)
            assert fingerprint.folder_fingerprint(folder) == first
    assert len(walks) == 1
