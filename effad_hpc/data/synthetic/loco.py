"""Synthetic categories in the MVTec LOCO AD layout: scenes of parts with logical anomalies.

A scene is a fixed arrangement of parts (so many of this kind in that compartment, pins in a
colour order). Normal images vary in the parts' poses, the lighting and the clutter; logical
anomalies break the arrangement (a part missing, an extra part, a misplaced part, a part of the
wrong colour or size, two pins swapped) while every part still looks flawless; structural
anomalies damage a part or the scene. Each anomalous region is its own ground-truth PNG whose
pixel value names its defect in ``defects_config.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from effad_hpc.data.synthetic.render import (
    Rng,
    apply_lighting,
    contamination,
    draw_visible,
    mask_to_pil,
    save_png,
    scratch,
    smooth_noise,
    to_pil,
)

SUPERSAMPLE = 3  # draw shapes at 3x and downsample: smooth edges, as a camera would see them
ASPECT = 1.45  # LOCO images are wider than high (e.g. 1600 x 1100)


@dataclass(frozen=True)
class Part:
    shape: str  # "hexagon", "washer", "bar", "pin"
    color: tuple[float, float, float]
    radius: float  # fraction of the image height
    x: float  # centre, fractions of width and height
    y: float
    angle: float = 0.0

    def nominal_area(self, height: int) -> float:
        r = self.radius * height
        return {"hexagon": 1.5 * math.sqrt(3) * r * r, "bar": 2 * r * 0.32 * r, "washer": 0.85 * math.pi * r * r,
                "pin": math.pi * r * r}[self.shape]


    def half_extent(self) -> tuple[float, float]:
        """Half width and half height of the part's bounding box, in fractions of the height."""
        if self.shape != "bar":
            return self.radius, self.radius
        c, s = abs(math.cos(self.angle)), abs(math.sin(self.angle))
        return self.radius * c + 0.16 * self.radius * s, self.radius * s + 0.16 * self.radius * c


def _polygon(part: Part, width: int, height: int) -> list[tuple[float, float]]:
    cx, cy, r = part.x * width, part.y * height, part.radius * height
    if part.shape == "hexagon":
        corners = [(r, part.angle + k * math.pi / 3) for k in range(6)]
    else:  # bar: a long rectangle
        half_w, half_h = r, 0.16 * r
        corners = [(math.hypot(half_w, half_h), part.angle + sign * math.atan2(half_h, half_w) + offset)
                   for offset, sign in ((0, 1), (math.pi, -1), (math.pi, 1), (0, -1))]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for d, a in corners]


def _draw_part(draw: ImageDraw.ImageDraw, part: Part, width: int, height: int, fill) -> None:
    """Draw a part; ``fill`` is an RGB tuple (scene) or 255 (footprint mask)."""
    cx, cy, r = part.x * width, part.y * height, part.radius * height
    if part.shape in ("hexagon", "bar"):
        draw.polygon(_polygon(part, width, height), fill=fill)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    if part.shape in ("hexagon", "washer"):  # a bore; the footprint keeps it (it belongs to the part)
        hole = 0.38 * r
        bore = (30, 30, 30) if isinstance(fill, tuple) else fill
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=bore)


def _rgb(color: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(round(255 * min(max(c, 0.0), 1.0))) for c in color)


def _footprint(parts: list[Part], width: int, height: int) -> np.ndarray:
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    for part in parts:
        _draw_part(draw, part, width * SUPERSAMPLE, height * SUPERSAMPLE, 255)
    return np.asarray(big.resize((width, height), Image.Resampling.BOX)) >= 128


# --- scenes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compartment:
    """A box (fractions of width and height) that holds ``count`` parts made by ``make``."""

    box: tuple[float, float, float, float]
    count: int
    make: Callable[[Rng], Part]


class NoRoom(Exception):
    """A part found no free spot in its compartment; the scene is drawn again (see :func:`scene`)."""


def _place(rng: Rng, compartment: Compartment, others: list[Part], aspect: float) -> Part:
    """A part of the compartment's kind at a random free spot inside its box; :class:`NoRoom` if
    200 random spots are all taken."""
    x0, y0, x1, y1 = compartment.box
    template = compartment.make(rng)
    for _ in range(200):
        half_w, half_h = template.half_extent()
        margin_x, margin_y = half_w / aspect * 1.05, half_h * 1.05
        x = rng.uniform(x0 + margin_x, x1 - margin_x)
        y = rng.uniform(y0 + margin_y, y1 - margin_y)
        if all(math.hypot((x - o.x) * aspect, y - o.y) > (template.radius + o.radius) * 1.1 for o in others):
            return replace(template, x=x, y=y)
    raise NoRoom


STEEL = (0.62, 0.64, 0.68)
ORANGE = (0.93, 0.55, 0.15)
WRONG_COLOURS = ((0.2, 0.45, 0.9), (0.85, 0.15, 0.2), (0.25, 0.7, 0.3))


def _nut(rng: Rng) -> Part:
    return Part("hexagon", STEEL, 0.085 * rng.uniform(0.97, 1.03), 0, 0, rng.uniform(0, math.pi))


def _bolt(rng: Rng) -> Part:
    return Part("bar", STEEL, 0.2 * rng.uniform(0.97, 1.03), 0, 0, rng.uniform(-0.3, 0.3) + math.pi / 2)


def _ring(rng: Rng) -> Part:
    return Part("washer", ORANGE, 0.065 * rng.uniform(0.97, 1.03), 0, 0)


TRAY_COMPARTMENTS = (
    Compartment((0.08, 0.1, 0.36, 0.9), 2, _nut),
    Compartment((0.36, 0.1, 0.64, 0.9), 1, _bolt),
    Compartment((0.64, 0.1, 0.92, 0.9), 3, _ring),
)
PIN_COLOURS = ((0.85, 0.15, 0.15), (0.95, 0.85, 0.2), (0.2, 0.4, 0.9), (0.85, 0.15, 0.15), (0.95, 0.95, 0.95))
PIN_XS = tuple(0.22 + 0.14 * k for k in range(5))
PIN_Y = 0.42


@dataclass
class Layout:
    parts: list[Part]
    regions: list[tuple[str, list[Part]]]  # logical defect name and the parts that show it

    def remove_random_part(self, rng: Rng) -> None:
        """The "missing_part" anomaly, alike in every scene: its region is where the part was."""
        gone = self.parts.pop(int(rng.integers(len(self.parts))))
        self.regions.append(("missing_part", [gone]))


def tray_layout(rng: Rng) -> Layout:
    parts: list[Part] = []
    for compartment in TRAY_COMPARTMENTS:
        for _ in range(compartment.count):
            parts.append(_place(rng, compartment, parts, ASPECT))
    return Layout(parts, [])


def pin_layout(rng: Rng) -> Layout:
    radius = 0.055
    parts = [Part("pin", colour, radius * rng.uniform(0.97, 1.03), x + rng.normal(0, 0.004),
                  PIN_Y + rng.normal(0, 0.006))
             for x, colour in zip(PIN_XS, PIN_COLOURS)]
    return Layout(parts, [])


def _tray_logical(name: str, layout: Layout, rng: Rng) -> None:
    parts = layout.parts
    if name == "missing_part":
        layout.remove_random_part(rng)
    elif name == "extra_part":
        target = TRAY_COMPARTMENTS[int(rng.integers(len(TRAY_COMPARTMENTS)))]
        extra = _place(rng, target, parts, ASPECT)
        parts.append(extra)
        layout.regions.append((name, [extra]))
    elif name == "misplaced_part":
        index = int(rng.integers(len(parts)))
        home = next(c for c in TRAY_COMPARTMENTS if c.box[0] <= parts[index].x <= c.box[2])
        moved_to = [c for c in TRAY_COMPARTMENTS if c is not home and c.make is not _bolt]
        destination = moved_to[int(rng.integers(len(moved_to)))]
        others = parts[:index] + parts[index + 1:]
        moved = _place(rng, replace(destination, make=lambda _rng, p=parts[index]: p), others, ASPECT)
        parts[index] = moved
        layout.regions.append((name, [moved]))
    elif name == "wrong_colour":
        index = int(rng.integers(len(parts)))
        parts[index] = replace(parts[index], color=WRONG_COLOURS[int(rng.integers(len(WRONG_COLOURS)))])
        layout.regions.append((name, [parts[index]]))
    else:
        raise ValueError(name)


def _pin_logical(name: str, layout: Layout, rng: Rng) -> None:
    parts = layout.parts
    if name == "missing_part":
        layout.remove_random_part(rng)
    elif name == "swapped_pins":
        i, j = 0, 0
        while PIN_COLOURS[i] == PIN_COLOURS[j]:
            i, j = (int(k) for k in rng.choice(len(parts), size=2, replace=False))
        parts[i], parts[j] = replace(parts[i], color=parts[j].color), replace(parts[j], color=parts[i].color)
        layout.regions.append((name, [parts[i], parts[j]]))  # two regions of one defect
    elif name == "wrong_size":
        index = int(rng.integers(len(parts)))
        parts[index] = replace(parts[index], radius=parts[index].radius * rng.choice([0.6, 1.45]))
        layout.regions.append((name, [parts[index]]))
    elif name == "extra_part":
        extra = Part("pin", PIN_COLOURS[int(rng.integers(len(PIN_COLOURS)))], 0.055,
                     rng.uniform(0.22, 0.78), rng.uniform(0.68, 0.8))
        parts.append(extra)
        layout.regions.append((name, [extra]))
    else:
        raise ValueError(name)


def _tray_background(rng: Rng, width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    """A table with a light tray divided into three compartments."""
    table = 0.25 + 0.04 * smooth_noise(rng, height, width, 5)
    canvas = Image.fromarray(np.round(np.repeat(table[..., None], 3, 2) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    tray = (0.05 * width, 0.06 * height, 0.95 * width, 0.94 * height)
    draw.rounded_rectangle(tray, radius=0.04 * height, fill=_rgb((0.82, 0.82, 0.8)))
    for wall in (0.36, 0.64):
        draw.line([(wall * width, 0.08 * height), (wall * width, 0.92 * height)], fill=_rgb((0.55, 0.55, 0.55)),
                  width=max(1, round(0.012 * height)))
    area = np.zeros((height, width), bool)
    area[round(tray[1]):round(tray[3]), round(tray[0]):round(tray[2])] = True
    return canvas, area


def _pin_background(rng: Rng, width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    """A green circuit board with five sockets, a cable and a label of varying position."""
    canvas = Image.new("RGB", (width, height), _rgb((0.15, 0.15, 0.17)))
    draw = ImageDraw.Draw(canvas)
    board = (0.08 * width, 0.12 * height, 0.92 * width, 0.88 * height)
    draw.rectangle(board, fill=_rgb((0.12, 0.42, 0.2)))
    for x in PIN_XS:
        r = 0.07 * height
        draw.ellipse([x * width - r, PIN_Y * height - r, x * width + r, PIN_Y * height + r], fill=_rgb((0.1, 0.1, 0.1)))
    bend = rng.uniform(-0.1, 0.1)
    cable = [(0.92 * width, (0.7 + bend) * height), (0.8 * width, (0.62 - bend) * height),
             (0.6 * width, (0.7 + bend / 2) * height), (0.45 * width, 0.64 * height)]
    draw.line(cable, fill=_rgb((0.05, 0.05, 0.05)), width=max(2, round(0.035 * height)), joint="curve")
    lx = rng.uniform(0.15, 0.3)
    draw.rectangle([lx * width, 0.74 * height, (lx + 0.12) * width, 0.82 * height], fill=_rgb((0.92, 0.92, 0.88)))
    area = np.zeros((height, width), bool)
    area[round(board[1]):round(board[3]), round(board[0]):round(board[2])] = True
    return canvas, area


@dataclass(frozen=True)
class LocoCategory:
    layout: Callable[[Rng], Layout]
    break_rule: Callable[[str, Layout, Rng], None]
    background: Callable[[Rng, int, int], tuple[Image.Image, np.ndarray]]
    logical: tuple[str, ...]
    structural: tuple[str, ...] = ("scratch", "contamination")


LOCO_CATEGORIES: dict[str, LocoCategory] = {
    "parts_tray": LocoCategory(tray_layout, _tray_logical, _tray_background,
                               ("missing_part", "extra_part", "misplaced_part", "wrong_colour")),
    "pin_board": LocoCategory(pin_layout, _pin_logical, _pin_background,
                              ("missing_part", "extra_part", "swapped_pins", "wrong_size")),
}

SCENE_ATTEMPTS = 100  # at most a third of the draws find no room: 100 failures in a row are a 1e-45 chance


def scene(category: LocoCategory, rng: Rng, defect: str | None = None) -> Layout:
    """A normal scene, or one that breaks the rule ``defect`` (a logical anomaly); a whole new
    scene is drawn from the same generator while a part finds no room, so this is deterministic.

    Parts keep a radius of clearance and a bolt's radius is its half length, so an extra bolt
    never fits beside the bolt and a moved bolt rarely fits among the nuts or rings: about a third
    of the "extra_part" and a sixth of the "misplaced_part" draws need another scene. A scene that
    fits at once is the one this function always gave, so existing data sets stay as they were.
    """
    for _ in range(SCENE_ATTEMPTS):
        try:
            layout = category.layout(rng)
            if defect is not None:
                category.break_rule(defect, layout, rng)
            return layout
        except NoRoom:
            continue
    raise RuntimeError(f"synthetic scene: no room for the parts of {defect or 'a normal scene'} "
                       f"in {SCENE_ATTEMPTS} scenes")


def _render(category: LocoCategory, layout: Layout, rng: Rng, width: int,
            height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene as a float image, plus the masks of all parts and of the scene's work area."""
    background, area = category.background(rng, width, height)
    big = background.resize((width * SUPERSAMPLE, height * SUPERSAMPLE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    for part in layout.parts:
        shade = rng.uniform(0.93, 1.07)
        _draw_part(draw, part, width * SUPERSAMPLE, height * SUPERSAMPLE, _rgb(tuple(c * shade for c in part.color)))
    image = np.asarray(big.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return image.copy(), _footprint(layout.parts, width, height), area


def _defects_config(category: LocoCategory, height: int) -> list[dict]:
    """Pixel values count down from 255; missing/extra parts saturate at one part's area."""
    names = list(category.logical) + list(category.structural)
    probe = scene(category, np.random.default_rng(0)).parts[0]
    entries = []
    for k, name in enumerate(names):
        absolute = name in ("missing_part", "extra_part")
        entries.append({
            "defect_name": name,
            "pixel_value": 255 - k,
            "saturation_threshold": round(probe.nominal_area(height)) if absolute else 1.0,
            "relative_saturation": not absolute,
        })
    return entries


def write_category(out: Path, name: str, rng_for: Callable[..., Rng], size: int, num_train: int,
                   num_validation: int, num_test_good: int, num_test_per_defect: int) -> None:
    category = LOCO_CATEGORIES[name]
    height, width = size, round(size * ASPECT)
    config = _defects_config(category, height)
    value_of = {entry["defect_name"]: entry["pixel_value"] for entry in config}
    (out).mkdir(parents=True, exist_ok=True)
    (out / "defects_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def good(split: str, folder: Path, count: int) -> None:
        for i in range(count):
            rng = rng_for(split, i)
            image, _, _ = _render(category, scene(category, rng), rng, width, height)
            save_png(to_pil(apply_lighting(image, rng)), folder / f"{i:03d}.png")

    good("train", out / "train" / "good", num_train)
    good("validation", out / "validation" / "good", num_validation)
    good("test_good", out / "test" / "good", num_test_good)

    for kind, defects in (("logical_anomalies", category.logical), ("structural_anomalies", category.structural)):
        index = 0
        for defect in defects:
            for i in range(num_test_per_defect):
                rng = rng_for(f"test_{defect}", i)
                layout = scene(category, rng, defect if kind == "logical_anomalies" else None)
                image, parts_mask, area = _render(category, layout, rng, width, height)
                if kind == "logical_anomalies":
                    regions = [(n, _footprint([p], width, height)) for n, ps in layout.regions for p in ps]
                elif defect == "scratch":
                    regions = [(defect, draw_visible(scratch, image, rng, parts_mask))]
                else:
                    regions = [(defect, draw_visible(contamination, image, rng, area))]
                stem = f"{index:03d}"
                save_png(to_pil(apply_lighting(image, rng)), out / "test" / kind / f"{stem}.png")
                for r, (defect_name, mask) in enumerate(regions):
                    save_png(mask_to_pil(mask, value_of[defect_name]),
                             out / "ground_truth" / kind / stem / f"{r:03d}.png")
                index += 1
