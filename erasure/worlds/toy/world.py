"""The toy world: procedurally rendered 32×32 scenes of coloured shapes, each with a templated caption
and its ground truth.

Its concepts mirror the papers' settings: objects (shapes, with near neighbours such as circle / ring
and square / diamond), a style that cuts across objects (striped, checkered), colours, backgrounds, and
scenes of two objects at once. "shape" is the world's generic word (any shape), the analogue of a
superclass anchor such as "dog" for a breed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels per side
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down, for clean edges

SHAPES = ("circle", "ring", "square", "triangle", "star", "heart", "cross", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 60, 200), "orange": (245, 135, 30)}
STYLES = ("solid", "striped", "checkered")
BACKGROUNDS = {"black": (12, 12, 12), "gray": (120, 120, 120), "white": (240, 240, 240)}
GENERIC_SHAPE = "shape"


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    style: str


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    caption: str
    seed: int  # places, sizes and colour jitter are drawn from it


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = [*SHAPES, *COLOURS, *STYLES, *BACKGROUNDS, GENERIC_SHAPE, "a", "an", "and", "on", "background"]
    return list(dict.fromkeys(words))


def describe(thing: Thing, say_colour: bool = True, say_style: bool = True, say_shape: bool = True) -> str:
    words = [thing.style if say_style else "", thing.colour if say_colour else "",
             thing.shape if say_shape else GENERIC_SHAPE]
    return " ".join(w for w in words if w)


def article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def caption(things: tuple[str, ...], background: str | None) -> str:
    text = " and ".join(article(t) for t in things)
    return f"{text} on a {background} background" if background else text


def sample_scene(rng: random.Random, two_objects: float = 0.25) -> Scene:
    """A random scene and a caption that names some of its attributes; unnamed ones are random, so the
    model learns what each word pins down (e.g. "a red shape" is any red shape)."""
    background = rng.choice(list(BACKGROUNDS))
    colours = [c for c in COLOURS]
    if rng.random() < two_objects:
        shapes = rng.sample(SHAPES, 2)
        things = tuple(Thing(s, rng.choice(colours), "solid" if rng.random() < 0.6 else rng.choice(STYLES))
                       for s in shapes)
        words = tuple(describe(t, say_style=t.style != "solid" and rng.random() < 0.5) for t in things)
    else:
        thing = Thing(rng.choice(SHAPES), rng.choice(colours), rng.choice(STYLES))
        things = (thing,)
        words = (describe(thing, say_colour=rng.random() < 0.8, say_style=rng.random() < 0.6,
                          say_shape=rng.random() > 0.1),)
    said_background = background if rng.random() < 0.5 else None
    return Scene(things, background, caption(words, said_background), rng.randrange(2**31))


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "heart":
        points = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x * r / 16, cy - (y + 2) * r / 16))
        return points
    if shape == "cross":
        a, b = r, r * 0.34
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    return None


def _mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    return mask


def _pattern(style: str, size: int, period: int, rng: random.Random) -> np.ndarray:
    """1 where the thing shows its colour, 0 where its darker shade shows."""
    y, x = np.mgrid[0:size, 0:size]
    offset = rng.randrange(period)
    if style == "striped":
        return (((x + y + offset) // (period // 2)) % 2 == 0).astype(np.float32)
    if style == "checkered":
        return ((((x + offset) // (period // 2)) + ((y + offset) // (period // 2))) % 2 == 0).astype(np.float32)
    return np.ones((size, size), np.float32)


def render(scene: Scene) -> Image.Image:
    """The scene as a 32×32 RGB image; the same scene always gives the same pixels."""
    rng = random.Random(scene.seed)
    big = SIZE * SUPERSAMPLE
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = _jitter(BACKGROUNDS[scene.background], rng, 6)
    n = len(scene.things)
    for i, thing in enumerate(scene.things):
        if n == 1:
            r = rng.uniform(9.5, 12.5)
            cx, cy = SIZE / 2 + rng.uniform(-2.5, 2.5), SIZE / 2 + rng.uniform(-2.5, 2.5)
        else:
            r = rng.uniform(6.0, 7.0)
            cx = SIZE * (0.27 if i == 0 else 0.73) + rng.uniform(-1, 1)
            cy = SIZE / 2 + rng.uniform(-5, 5)
        mask = np.asarray(_mask(thing.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, big),
                          np.float32)[..., None] / 255
        colour = np.array(_jitter(COLOURS[thing.colour], rng, 12), np.float32)
        pattern = _pattern(thing.style, big, 6 * SUPERSAMPLE, rng)[..., None]
        fill = colour * pattern + colour * 0.4 * (1 - pattern)
        canvas = canvas * (1 - mask) + fill * mask
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8))


def _jitter(rgb, rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def scenes(count: int, seed: int, two_objects: float = 0.25) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, two_objects) for _ in range(count)]


def render_batch(batch: list[Scene]) -> np.ndarray:
    """uint8 [n, 32, 32, 3]."""
    return np.stack([np.asarray(render(s)) for s in batch])
