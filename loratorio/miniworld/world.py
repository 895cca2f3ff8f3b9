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
# The strong regime's world (two-figure scenes) adds one generic word, "two", and judges each character by presence.
TWO = "two"
VOCAB_STRONG = (*VOCAB, TWO)
STRONG_CATEGORIES = ("knight", "ghost", "clothing", "style", "background")
# Figure kinds 3.. mix the knight and the ghost in one figure, as merging their LoRAs tends to: neither character.
HYBRIDS = ("cyan_cross", "red_dome", "blend", "overlay", "split")


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
    return _compose([(attrs.character, lay)], attrs.clothing, attrs.style, _background(attrs.background, lay))


def _grid() -> tuple[Tensor, Tensor]:
    return torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")


def _compose(figures: Sequence[tuple[int, Layout]], clothing: int, style: int, img: Tensor) -> Tensor:
    """Draw each figure (with its clothing) over the background image, then apply the style to everything."""
    y, x = _grid()
    for kind, lay in figures:
        img = _figure(img, kind, lay, y, x)
        img = _clothing(img, clothing, lay, y, x)
    if style == 1:  # hatch: dark diagonal lines over the whole image
        img = torch.where(((x + y) % 4 == 0), img * 0.3, img)
    elif style == 2:  # sepia: luminance re-tinted brown
        lum = (img * _rgb((0.3, 0.59, 0.11))).sum(0, keepdim=True)
        img = lum * _rgb((1.0, 0.78, 0.5)) + _rgb((0.08, 0.04, 0.0))
    return img.clamp(0, 1)


KNIGHT_RED, GHOST_CYAN, GHOST_EYES = (0.9, 0.1, 0.1), (0.6, 0.95, 0.95), (0.05, 0.05, 0.1)


def _knight_body(dy: Tensor, dx: Tensor, s: int) -> Tensor:
    return ((dx.abs() <= s) & (dy.abs() <= 2)) | ((dx.abs() <= 2) & (dy.abs() <= s))


def _ghost_body(dy: Tensor, dx: Tensor, x: Tensor, s: int) -> tuple[Tensor, Tensor]:
    hem = s - (x.long() % 3 == 0).float()
    body = ((dy <= 0) & (dx**2 + dy**2 <= s * s)) | ((dy > 0) & (dy <= hem) & (dx.abs() <= s))
    eyes = ((dy + 1).abs() <= 0.5) & ((dx.abs() - 2).abs() <= 0.5)
    return body, eyes


def _figure(img: Tensor, kind: int, lay: Layout, y: Tensor, x: Tensor) -> Tensor:
    """One figure: 0 generic, 1 knight, 2 ghost, or a hybrid of the two (HYBRIDS, kinds 3.., neither character)."""
    dy, dx, s = y - lay.cy, x - lay.cx, lay.size
    if kind == 1:  # knight: a red cross
        return torch.where(_knight_body(dy, dx, s), _rgb(KNIGHT_RED), img)
    if kind == 2:  # ghost: a pale cyan dome with a wavy hem and two dark eyes
        body, eyes = _ghost_body(dy, dx, x, s)
        img = torch.where(body & ~eyes, _rgb(GHOST_CYAN), img)
        return torch.where(eyes, _rgb(GHOST_EYES), img)
    if kind == 0:  # generic figure: a muted ellipse or box
        if lay.shape == "round":
            body = (dx / s) ** 2 + (dy / (s + 0.5)) ** 2 <= 1
        else:
            body = (dx.abs() <= s - 1) & (dy.abs() <= s)
        return torch.where(body, _rgb(FIGURE_COLOURS[lay.colour]), img)
    return _hybrid(img, HYBRIDS[kind - 3], lay, y, x)


def _hybrid(img: Tensor, kind: str, lay: Layout, y: Tensor, x: Tensor) -> Tensor:
    """What merging two character LoRAs tends to give: one figure mixing both; the judge counts it as neither."""
    dy, dx, s = y - lay.cy, x - lay.cx, lay.size
    knight = _figure(img, 1, lay, y, x)
    ghost = _figure(img, 2, lay, y, x)
    if kind == "cyan_cross":  # the knight's shape in the ghost's colours
        return torch.where(_knight_body(dy, dx, s), _rgb(GHOST_CYAN), img)
    if kind == "red_dome":  # the ghost's shape and eyes in the knight's red
        body, eyes = _ghost_body(dy, dx, x, s)
        return torch.where(eyes, _rgb(GHOST_EYES), torch.where(body, _rgb(KNIGHT_RED), img))
    if kind == "blend":  # both drawn half-transparent over each other
        return 0.5 * knight + 0.5 * ghost
    if kind == "overlay":  # the cross drawn over the dome
        return _figure(ghost, 1, lay, y, x)
    if kind == "split":  # left half knight, right half ghost
        return torch.where(dx < 0, knight, ghost)
    raise ValueError(f"unknown hybrid {kind!r}; known: {HYBRIDS}")


def _clothing(img: Tensor, kind: int, lay: Layout, y: Tensor, x: Tensor) -> Tensor:
    dy, dx, s = y - lay.cy, x - lay.cx, lay.size
    top = lay.cy - s
    if kind == 1:  # hat: a yellow triangle on top of the figure
        rise = y - (top - 6)
        hat = (rise >= 0) & (y <= top - 1) & (dx.abs() <= rise * s / 5)
        img = torch.where(hat, _rgb((1.0, 0.85, 0.1)), img)
    elif kind == 2:  # scarf: a green band at the neck with a tail down one side
        band = (dy >= -1) & (dy <= 0) & (dx.abs() <= s + 1)
        tail = (dx >= s - 1) & (dx <= s + 1) & (dy >= 0) & (dy <= 6)
        img = torch.where(band | tail, _rgb((0.1, 0.7, 0.3)), img)
    return img


def _background(kind: int, lay: Layout) -> Tensor:
    y, x = _grid()
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


# --- The strong regime's world: one or two figures per scene -------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A scene of the strong regime: its figures' kinds (0 generic, 1 knight, 2 ghost, 3.. hybrids) and the slots."""

    figures: tuple[int, ...] = (0,)
    clothing: int = 0
    style: int = 0
    background: int = 0

    def __post_init__(self) -> None:
        if len(self.figures) not in (1, 2) or not all(0 <= f < 3 + len(HYBRIDS) for f in self.figures):
            raise ValueError(f"a scene has one or two figures of kinds 0..{2 + len(HYBRIDS)}, got {self.figures}")

    def labels(self) -> tuple[int, int, int, int, int]:
        """The judge's targets over STRONG_CATEGORIES: knight present, ghost present (0/1), then the three slots."""
        return (int(1 in self.figures), int(2 in self.figures), self.clothing, self.style, self.background)

    def skills(self) -> list[str]:
        """Skill tokens present: characters first (knight before ghost), then clothing, style, background."""
        chars = [SKILLS["character"][k - 1] for k in (1, 2) if k in self.figures]
        rest = Attributes(0, self.clothing, self.style, self.background).skills()
        return chars + rest

    def prompt(self) -> list[str]:
        """The words that request this scene: its skills, plus "two" for a two-figure scene."""
        return self.skills() + ([TWO] if len(self.figures) == 2 else [])

    @classmethod
    def from_skills(cls, skills: Sequence[str], figures: int | None = None) -> Scene:
        """The scene a prompt asks for; two named characters make a two-figure scene (one each)."""
        attrs = dict.fromkeys(CATEGORIES[1:], 0)
        chars = []
        for s in skills:
            cat = category_of(s)
            if cat == "character":
                chars.append(SKILLS[cat].index(s) + 1)
            else:
                attrs[cat] = SKILLS[cat].index(s) + 1
        count = figures or max(1, len(chars))
        kinds = tuple(sorted(chars)) + (0,) * (count - len(chars))
        return cls(kinds, **attrs)


def pair_layout(seed: int) -> tuple[Layout, Layout]:
    """Two smaller figures, one in each half of the image; their own shapes and colours, one shared plain colour."""
    r = random.Random(seed * 7 + 3)  # another stream than layout(seed), whose numbers stay the weak regime's

    def one(cx_lo: int, cx_hi: int, plain: str) -> Layout:
        return Layout(cx=r.randint(cx_lo, cx_hi), cy=r.randint(14, 20), size=r.randint(4, 5),
                      shape=r.choice(FIGURE_SHAPES), colour=r.choice(sorted(FIGURE_COLOURS)), plain=plain)
    plain = r.choice(sorted(PLAIN_COLOURS))
    return one(7, 10, plain), one(21, 24, plain)


def render_scene(scene: Scene, seed: int) -> Tensor:
    """The image (3, 32, 32) of a scene; a one-figure scene of kinds 0..2 is exactly render()'s image.

    In a two-figure scene the figures' order is shuffled by the seed, so a character shows up on either side.
    """
    if len(scene.figures) == 1:
        lays = [layout(seed)]
        kinds = list(scene.figures)
    else:
        lays = list(pair_layout(seed))
        kinds = list(scene.figures)
        if random.Random(seed).random() < 0.5:
            kinds.reverse()
    return _compose(list(zip(kinds, lays, strict=True)), scene.clothing, scene.style,
                    _background(scene.background, lays[0]))


def caption_scene(scene: Scene, seed: int, rng: random.Random, keep_generic: float = 0.5) -> list[str]:
    """Training caption of a scene: its skills, "two" always for two figures, and some generic words as caption()."""
    if len(scene.figures) == 1 and scene.figures[0] <= 2:
        return caption(Attributes(scene.figures[0], scene.clothing, scene.style, scene.background), seed, rng,
                       keep_generic)
    words = ["figure"] if 0 in scene.figures else []
    if scene.background == 0:
        words += ["plain", pair_layout(seed)[0].plain]
    words = [w for w in words if rng.random() < keep_generic]
    return scene.prompt() + words


def render_scenes(scenes: Sequence[Scene], seeds: Sequence[int]) -> Tensor:
    """Stack of render_scene() as (B, 3, 32, 32) in [0, 1]."""
    return torch.stack([render_scene(s, seed) for s, seed in zip(scenes, seeds, strict=True)])


def two_character_sets(n: int) -> list[list[str]]:
    """Both characters in one image plus one skill from each of N−2 distinct other categories (N = 2..4)."""
    if not 2 <= n <= len(CATEGORIES):
        raise ValueError(f"N must be in 2..{len(CATEGORIES)}, got {n}")
    out = []
    for cats in itertools.combinations(CATEGORIES[1:], n - 2):
        for picks in itertools.product(*(SKILLS[c] for c in cats)):
            out.append([*SKILLS["character"], *picks])
    return out


# --- The tuning / test split ----------------------------------------------------------------------------------------
# Fixed before any option was tuned (issue 13): defaults and options are chosen on "tune", the README reports "test".
# Within each group of sets (one N, one kind) a seeded shuffle sends half to each side; a group of one set goes to
# both sides, and the two sides then draw disjoint seeds for it (SPLIT_SEED_OFFSET).
HALVES = ("tune", "test")
SPLIT_SEED_OFFSET = 50


def split_sets(sets: Sequence[Sequence[str]], half: str, group: str) -> list[int]:
    """Indices into `sets` (one group, e.g. "weak-3") of the sets that belong to `half`."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    if len(sets) == 1:
        return [0]
    order = list(range(len(sets)))
    random.Random(f"loratorio-split-{group}").shuffle(order)
    cut = (len(sets) + 1) // 2
    return sorted(order[:cut] if half == "tune" else order[cut:])
