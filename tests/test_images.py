"""read_rgb and read_label_map give the 8-bit twin's values whatever the file's mode and bit depth."""

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.datasets import load_sample_image

from effad_hpc.data import images
from effad_hpc.data.dataset import resize_image
from effad_hpc.data.images import read_label_map, read_rgb
from effad_hpc.data.mvtec import CategoryData, DefectSpec, Sample
from effad_hpc.errors import DataError

# A real photo, not square, so that a swapped width and height would show.
RGB8 = load_sample_image("flower.jpg")[100:148, 200:264].copy()
GRAY8 = np.asarray(Image.fromarray(RGB8).convert("L"))


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def write_png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG of gray, gray+alpha, RGB or RGBA values; Pillow cannot write the last three."""
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if values.ndim == 2 else values.shape[2]]
    height, width = values.shape[:2]
    rows = values.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def to16(values8: np.ndarray) -> np.ndarray:
    return values8.astype(np.uint16) * 257  # 255 -> 65535: the 16-bit twin of an 8-bit value


def save(image: Image.Image, path):
    image.save(path)
    return path


def palette_twin() -> tuple[Image.Image, np.ndarray]:
    palette = Image.fromarray(RGB8).quantize(64)
    return palette, np.asarray(palette.convert("RGB"))


# name -> (writer of the file into tmp_path, the mode Pillow opens it in, the 8-bit RGB twin)
CASES = {
    "L png": (lambda d: save(Image.fromarray(GRAY8), d / "a.png"), "L", as_rgb(GRAY8)),
    "1 png": (lambda d: save(Image.fromarray(GRAY8 > 128), d / "a.png"), "1", as_rgb((GRAY8 > 128) * 255)),
    "I;16 png": (lambda d: save(Image.fromarray(to16(GRAY8)), d / "a.png"), "I;16", as_rgb(GRAY8)),
    "I;16 tiff": (lambda d: tifffile.imwrite(d / "a.tif", to16(GRAY8)) or d / "a.tif", "I;16", as_rgb(GRAY8)),
    "I;16B tiff": (lambda d: save(Image.frombytes("I;16B", GRAY8.shape[::-1], to16(GRAY8).astype(">u2").tobytes()),
                                  d / "a.tif"), "I;16B", as_rgb(GRAY8)),
    # Pillow opens 16-bit gray + alpha as RGBA
    "16-bit LA png": (lambda d: write_png16(d / "a.png", np.dstack([to16(GRAY8), to16(GRAY8) // 2])) or d / "a.png",
                      "RGBA", as_rgb(GRAY8)),
    "RGB png": (lambda d: save(Image.fromarray(RGB8), d / "a.png"), "RGB", RGB8),
    "16-bit RGB png": (lambda d: write_png16(d / "a.png", to16(RGB8)) or d / "a.png", "RGB", RGB8),
    "16-bit RGB tiff": (lambda d: tifffile.imwrite(d / "a.tif", to16(RGB8)) or d / "a.tif", "RGB", RGB8),
    "16-bit RGBA png": (lambda d: write_png16(d / "a.png", to16(np.dstack([RGB8, GRAY8]))) or d / "a.png",
                        "RGBA", RGB8),
    # alpha 0 in half the image: its colours must survive (dropped, not composited on black)
    "RGBA png": (lambda d: save(Image.fromarray(np.dstack([RGB8, (GRAY8 > 128) * np.uint8(255)])), d / "a.png"),
                 "RGBA", RGB8),
    "LA png": (lambda d: save(Image.fromarray(np.dstack([GRAY8, GRAY8 // 2]), "LA"), d / "a.png"), "LA",
               as_rgb(GRAY8)),
    "P png": (lambda d: save(palette_twin()[0], d / "a.png"), "P", palette_twin()[1]),
    "P png, transparent": (lambda d: palette_twin()[0].save(d / "a.png", transparency=0) or d / "a.png", "P",
                           palette_twin()[1]),
    "PA tiff": (lambda d: save(palette_twin()[0].convert("PA"), d / "a.tif"), "PA", palette_twin()[1]),
    "CMYK tiff": (lambda d: save(Image.fromarray(RGB8).convert("CMYK"), d / "a.tif"), "CMYK", RGB8),
    "F tiff": (lambda d: tifffile.imwrite(d / "a.tif", GRAY8.astype(np.float32) / 255) or d / "a.tif", "F",
               as_rgb(GRAY8)),
}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_reads_as_its_8bit_twin(tmp_path, case):
    write, mode, twin = CASES[case]
    path = write(tmp_path)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the file really is in the mode under test
    image = read_rgb(path)
    assert image.mode == "RGB" and image.size == (RGB8.shape[1], RGB8.shape[0])
    assert np.abs(np.asarray(image, dtype=np.int16) - twin).max() <= 1
    tensor = resize_image(image, 32)
    expected = resize_image(Image.fromarray(twin.astype(np.uint8)), 32)
    assert tensor.shape == (3, 32, 32) and 0 <= tensor.min() and tensor.max() <= 1
    assert (tensor - expected).abs().max() <= 1 / 255 + 1e-6


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1, 128, 129], [257, 32768, 65534, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "a.png")
    gray = np.asarray(read_rgb(path))[..., 0]
    assert gray.tolist() == np.rint(values / 65535 * 255).astype(int).tolist()  # [[0 0 0 1] [1 128 255 255]]


@pytest.mark.parametrize("values", [GRAY8.astype(np.float32), np.full((4, 4), np.nan, dtype=np.float32)],
                         ids=["0..255", "nan"])
def test_float_tiff_outside_0_1_names_the_file(tmp_path, values):
    tifffile.imwrite(tmp_path / "a.tif", values)
    with pytest.raises(DataError, match=rf"{tmp_path / 'a.tif'}: float image \(mode F\)"):
        read_rgb(tmp_path / "a.tif")


@pytest.mark.parametrize("dtype", [np.int32, np.int16])
def test_32bit_and_signed_integer_images_name_the_file_and_mode(tmp_path, dtype):
    tifffile.imwrite(tmp_path / "a.tif", GRAY8.astype(dtype))
    with pytest.raises(DataError, match=rf"{tmp_path / 'a.tif'}: 32-bit or signed integer image \(mode I\)"):
        read_rgb(tmp_path / "a.tif")


def test_a_mode_pillow_cannot_convert_names_the_file_and_mode(tmp_path, monkeypatch):
    # No file format stores "La" (premultiplied gray + alpha), so hand it over directly.
    monkeypatch.setattr(images, "_open_fully", lambda path: Image.new("La", (4, 4)))
    with pytest.raises(DataError, match=rf"{tmp_path / 'a.png'}: image mode La cannot be converted"):
        read_rgb(tmp_path / "a.png")


def test_16bit_masks_keep_their_values(tmp_path):
    binary = np.zeros((6, 8), dtype=np.uint16)
    binary[1:3, 2:5] = 65535
    binary[5, 7] = 1  # a faint defect pixel, which scaling to 8 bits would round to background
    mask = read_label_map(save(Image.fromarray(binary), tmp_path / "binary.png"))
    assert mask.dtype == np.uint16 and np.array_equal(mask > 0, binary > 0)
    labels = np.where(binary > 0, 7, 0).astype(np.uint16)
    assert read_label_map(save(Image.fromarray(labels), tmp_path / "labels.png")).tolist() == labels.tolist()
    assert read_label_map(save(Image.fromarray((binary > 0) * np.uint8(255)), tmp_path / "a8.png")).dtype == np.uint8
    tifffile.imwrite(tmp_path / "negative.tif", np.full((2, 2), -1, dtype=np.int32))
    with pytest.raises(DataError, match=rf"{tmp_path / 'negative.tif'}: mask \(mode I\) has values outside"):
        read_label_map(tmp_path / "negative.tif")


def test_16bit_loco_mask_above_255_names_the_file(tmp_path):
    values = np.zeros((6, 8), dtype=np.uint16)
    values[1:3, 2:5] = 255 * 257  # an 8-bit LOCO value 255 written as 16-bit: not a LOCO value
    mask_path = save(Image.fromarray(values), tmp_path / "000.png")
    image_path = save(Image.fromarray(RGB8[:6, :8]), tmp_path / "image.png")
    sample = Sample("test/logical_anomalies/image", image_path, "test", "logical_anomalies", (mask_path,))
    data = CategoryData("box", "mvtec_loco", tmp_path, {"test": [sample]},
                        {255: DefectSpec("missing_part", 255, 1.0, False)})
    with pytest.raises(DataError, match=rf"{mask_path}: pixel value 65535 is not listed"):
        data.ground_truth(sample)
    values[values > 0] = 255  # the same mask with the value 8-bit LOCO masks carry, in a 16-bit file
    save(Image.fromarray(values), mask_path)
    [region] = data.ground_truth(sample)
    assert region.defect_name == "missing_part" and region.mask.sum() == 6
