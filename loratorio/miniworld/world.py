"""The miniature world: a seeded procedural 32×32 RGB image generator with ComposLoRA's four kinds of attribute.

An image is a figure (the character slot) on a background, optionally wearing clothing and rendered in a style.
Each slot is 0 (generic content, which the base model is trained on) or one of two skills (seen only by LoRAs).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SIZE = 32
CATEGORIES = ("character", "clothing", "style", "background")
# Two skills per category; index 1 and 2 in an attribute tuple (0 = generic content / none).
SKILLS = {
    "character": ("knight", "ghost"),
    "clothing": ("hat", "scarf"),
    "style": ("hatch", "sepia"),
    "background": ("sky", "grid"),
}
SKILL_TOKENS = tuple(t for c in CATEGORIES for t in SKILLS[c])
FIGURE_COLOURS = {"brown": (0.55, 0.35, 0.2), "olive": (0.5, 0.5, 0.15), "purple": (0.45, 0.3, 0.6),
                  "grey": (0.45, 0.45, 0.45)}
FIGURE_SHAPES = ("round", "box")
PLAIN_COLOURS = {"cream": (0.95, 0.9, 0.75), "mint": (0.75, 0.95, 0.8), "peach": (1.0, 0.8, 0.7),
                 "lilac": (0.85, 0.8, 0.95)}
GENERIC_TOKENS = ("figure", "plain", *FIGURE_SHAPES, *FIGURE_COLOURS, *PLAIN_COLOURS)
PAD = "<pad>"
VOCAB = (PAD, *GENERIC_TOKENS, *SKILL_TOKENS)
MAX_TOKENS = 8


@dataclass(frozen=True)
class Attributes:
    """One image's slots: 0 = generic/none, 1 or 2 = that category's skill."""

    character: int = 0
    clothing: int = 0
    style: int = 0
    background: int = 0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.character, self.clothing, self.style, self.background)

    def skills(self) -> list[str]:
        """Skill tokens present, in category order (ComposLoRA lists the character first)."""
        return [SKILLS[c][v - 1] for c, v in zip(CATEGORIES, self.as_tuple(), strict=True) if v]

    @classmethod
    def from_skills(cls, skills: Sequence[str]) -> Attributes:
        values = dict.fromkeys(CATEGORIES, 0)
        for s in skills:
            cat = category_of(s)
            values[cat] = SKILLS[cat].index(s) + 1
        return cls(**values)


def category_of(skill: str) -> str:
    for cat in CATEGORIES:
        if skill in SKILLS[cat]:
            return cat
    raise ValueError(f"unknown skill {skill!r}; known: {SKILL_TOKENS}")


@dataclass(frozen=True)
class Layout:
    """The seeded free parameters of an image: where the figure is, how big, which generic look."""

    cx: int
    cy: int
    size: int
    shape: str
    colour: str
    plain: str


def layout(seed: int) -> Layout:
    """Deterministic per-image free parameters (Python's Random: same numbers on every platform)."""
    r = random.Random(seed)
    return Layout(cx=r.randint(11, 20), cy=r.randint(13, 20), size=r.randint(5, 7), shape=r.choice(FIGURE_SHAPES),
                  colour=r.choice(sorted(FIGURE_COLOURS)), plain=r.choice(sorted(PLAIN_COLOURS)))


def _rgb(c: tuple[float, float, float]) -> Tensor:
    return torch.tensor(c).view(3, 1, 1)


def render(attrs: Attributes, seed: int) -> Tensor:
    """The image (3, 32, 32) in [0, 1] for these attributes; the seed fixes position, size and generic look."""
    lay = layout(seed)
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    img = _background(attrs.background, lay, y, x)
    dy, dx, s = y - lay.cy, x - lay.cx, lay.size
    if attrs.character == 1:  # knight: a red cross
        body = ((dx.abs() <= s) & (dy.abs() <= 2)) | ((dx.abs() <= 2) & (dy.abs() <= s))
        img = torch.where(body, _rgb((0.9, 0.1, 0.1)), img)
    elif attrs.character == 2:  # ghost: a pale cyan dome with a wavy hem and two dark eyes
        hem = s - (x.long() % 3 == 0).float()
        body = ((dy <= 0) & (dx**2 + dy**2 <= s * s)) | ((dy > 0) & (dy <= hem) & (dx.abs() <= s))
        eyes = ((dy + 1).abs() <= 0.5) & ((dx.abs() - 2).abs() <= 0.5)
        img = torch.where(body & ~eyes, _rgb((0.6, 0.95, 0.95)), img)
        img = torch.where(eyes, _rgb((0.05, 0.05, 0.1)), img)
    else:  # generic figure: a muted ellipse or box
        if lay.shape == "round":
            body = (dx / s) ** 2 + (dy / (s + 0.5)) ** 2 <= 1
        else:
            body = (dx.abs() <= s - 1) & (dy.abs() <= s)
        img = torch.where(body, _rgb(FIGURE_COLOURS[lay.colour]), img)
    top = lay.cy - s
    if attrs.clothing == 1:  # hat: a yellow triangle on top of the figure
        rise = y - (top - 6)
        hat = (rise >= 0) & (y <= top - 1) & (dx.abs() <= rise * s / 5)
        img = torch.where(hat, _rgb((1.0, 0.85, 0.1)), img)
    elif attrs.clothing == 2:  # scarf: a green band at the neck with a tail down one side
        band = (dy >= -1) & (dy <= 0) & (dx.abs() <= s + 1)
        tail = (dx >= s - 1) & (dx <= s + 1) & (dy >= 0) & (dy <= 6)
        img = torch.where(band | tail, _rgb((0.1, 0.7, 0.3)), img)
    if attrs.style == 1:  # hatch: dark diagonal lines over the whole image
        img = torch.where(((x + y) % 4 == 0), img * 0.3, img)
    elif attrs.style == 2:  # sepia: luminance re-tinted brown
        lum = (img * _rgb((0.3, 0.59, 0.11))).sum(0, keepdim=True)
        img = lum * _rgb((1.0, 0.78, 0.5)) + _rgb((0.08, 0.04, 0.0))
    return img.clamp(0, 1)


def _background(kind: int, lay: Layout, y: Tensor, x: Tensor) -> Tensor:
    if kind == 1:  # sky: deep blue at the top fading to white
        t = (y / (SIZE - 1)).expand(3, SIZE, SIZE)
        return _rgb((0.15, 0.35, 0.85)) * (1 - t) + _rgb((0.9, 0.95, 1.0)) * t
    if kind == 2:  # grid: light lines every 8 px on dark grey, at fixed places like a wallpaper
        lines = (x % 8 == 4) | (y % 8 == 4)
        return torch.where(lines, _rgb((0.8, 0.8, 0.8)), _rgb((0.25, 0.25, 0.3)))
    return _rgb(PLAIN_COLOURS[lay.plain]).expand(3, SIZE, SIZE).clone()


def caption(attrs: Attributes, seed: int, rng: random.Random, keep_generic: float = 0.5) -> list[str]:
    """Training caption: the skill triggers, plus each generic word describing the image with prob `keep_generic`."""
    lay = layout(seed)
    words = []
    if attrs.character == 0:
        words += ["figure", lay.shape, lay.colour]
    if attrs.background == 0:
        words += ["plain", lay.plain]
    words = [w for w in words if rng.random() < keep_generic]
    return attrs.skills() + words


def render_batch(attrs: Sequence[Attributes], seeds: Sequence[int]) -> Tensor:
    """Stack of render() as (B, 3, 32, 32) in [0, 1]."""
    return torch.stack([render(a, s) for a, s in zip(attrs, seeds, strict=True)])


def composition_sets(n: int) -> list[list[str]]:
    """ComposLoRA's construction: one character plus one skill from each of N−1 distinct other categories."""
    if not 2 <= n <= len(CATEGORIES):
        raise ValueError(f"N must be in 2..{len(CATEGORIES)}, got {n}")
    out = []
    others = CATEGORIES[1:]
    for char in SKILLS["character"]:
        for cats in itertools.combinations(others, n - 1):
            for picks in itertools.product(*(SKILLS[c] for c in cats)):
                out.append([char, *picks])
    return out
