"""Synthetic captioned shapes: the training data of ``builtin:shapes``.

Every sample is a 64×64 RGB scene — one shape (circle, square, triangle, diamond) in a named
colour, small or large, at a named position, on a plain or gradient background in another
named colour — and a caption built from those attributes with varied templates, word orders
and optional parts, so prompts can combine attributes that were never seen together.

Everything is generated on the fly and is a pure function of a seed (numpy + PIL only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64


# Named colours, chosen to be far apart in RGB (min pairwise distance ≈ 110).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 40),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")


SIZES: dict[str, tuple[int, int]] = {"small": (16, 20), "large": (30, 36)}  # extent in px


POSITIONS: dict[str, tuple[float, float]] = {  # nominal centre (x, y)
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
    "center": (32.0, 32.0),
}


POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "left"),
    "right": ("on the right", "at the right", "right"),
    "top": ("at the top", "on top", "top"),
    "bottom": ("at the bottom", "on the bottom", "bottom"),
    "center": ("in the center", "in the middle", "center"),
}


# Every word any caption can contain (the tokenizer gives each one its own token).
EXTRA_WORDS = (
    "a an the on in at of with and background gradient plain shape picture image "
    "middle top bottom left right center"
).split()


VOCAB_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys([*COLOURS, *SHAPES, *SIZES, *POSITIONS, *EXTRA_WORDS])
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    background_kind: str = "plain"
    # exact geometry (pixels); None means "nominal" (no jitter)
    cx: float | None = None
    cy: float | None = None
    extent: float | None = None
    gradient_dir: int = 0  # 0: top→bottom, 1: left→right, 2: bottom→top, 3: right→left
    gradient_to: str = "black"  # mixed into the far side of a gradient (black or white)

    def geometry(self) -> tuple[float, float, float]:
        cx, cy = POSITIONS[self.position]
        lo, hi = SIZES[self.size]
        return (
            self.cx if self.cx is not None else cx,
            self.cy if self.cy is not None else cy,
            self.extent if self.extent is not None else (lo + hi) / 2,
        )


def random_scene(rng: np.random.Generator) -> Scene:
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = colour
    while background == colour:
        background = names[rng.integers(len(names))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    cx, cy = POSITIONS[position]
    lo, hi = SIZES[size]
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour,
        size=size,
        position=position,
        background=background,
        background_kind="gradient" if rng.random() < 0.3 else "plain",
        cx=float(cx + rng.uniform(-3, 3)),
        cy=float(cy + rng.uniform(-3, 3)),
        extent=float(rng.uniform(lo, hi)),
        gradient_dir=int(rng.integers(4)),
        gradient_to="black" if rng.random() < 0.5 else "white",
    )


def _shape_polygon(shape: str, cx: float, cy: float, ext: float):
    h = ext / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    raise ValueError(shape)


def _draw_mask(scene: Scene, scale: int) -> Image.Image:
    cx, cy, ext = scene.geometry()
    img = Image.new("L", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), 0)
    d = ImageDraw.Draw(img)
    cx, cy, ext = cx * scale, cy * scale, ext * scale
    if scene.shape == "circle":
        h = ext / 2
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    else:
        d.polygon(_shape_polygon(scene.shape, cx, cy, ext), fill=255)
    return img


def shape_mask(scene: Scene) -> np.ndarray:
    """Boolean (64, 64) mask of the shape's pixels (True inside the shape)."""
    return np.asarray(_draw_mask(scene, 1)) > 127


def _background(scene: Scene) -> np.ndarray:
    base = np.array(COLOURS[scene.background], dtype=np.float32)
    out = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if scene.background_kind == "gradient":
        far = np.array(COLOURS[scene.gradient_to], dtype=np.float32)
        t = np.linspace(0.0, 0.45, IMAGE_SIZE, dtype=np.float32)
        if scene.gradient_dir >= 2:
            t = t[::-1]
        ramp = t[:, None] if scene.gradient_dir % 2 == 0 else t[None, :]
        ramp = np.broadcast_to(ramp, (IMAGE_SIZE, IMAGE_SIZE))[..., None]
        out = base * (1 - ramp) + far * ramp
    return out


def render(scene: Scene) -> Image.Image:
    """Render a scene as a 64×64 RGB image (anti-aliased edges)."""
    alpha = _draw_mask(scene, 4).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    out = _background(scene) * (1 - a) + fg * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


_TEMPLATES = (
    "{a} {size} {colour} {shape} {pos}, {bg}",
    "{a} {colour} {shape} {pos} on {a_bg} {bg}",
    "{a} {size} {colour} {shape} {pos} with {a_bg} {bg}",
    "{bg} with {a} {size} {colour} {shape} {pos}",
    "{colour} {shape}, {size}, {pos}, {bg}",
    "{a} {shape} in {colour}, {size}, {pos}, {bg}",
    "{a} picture of {a} {size} {colour} {shape} {pos} and {a_bg} {bg}",
    "{size} {colour} {shape} {pos} {bg}",
)


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption naming the scene's attributes.

    With ``rng`` the template, phrasing and which optional parts appear (size, position,
    background) are drawn at random; without it the full canonical caption is returned:
    "a small red circle on the left, blue background".
    """
    if rng is None:
        bg = f"{scene.background} background"
        if scene.background_kind == "gradient":
            bg = f"{scene.background} gradient background"
        return (
            f"{_article(scene.size)} {scene.size} {scene.colour} {scene.shape} "
            f"{POSITION_PHRASES[scene.position][0]}, {bg}"
        )
    size = scene.size if rng.random() < 0.75 else ""
    phrases = POSITION_PHRASES[scene.position]
    pos = phrases[rng.integers(len(phrases))] if rng.random() < 0.75 else ""
    bg = ""
    if rng.random() < 0.8:
        kind = ""
        if scene.background_kind == "gradient" and rng.random() < 0.7:
            kind = "gradient"
        elif scene.background_kind == "plain" and rng.random() < 0.2:
            kind = "plain"
        words = [scene.background, kind] if rng.random() < 0.8 else [kind, scene.background]
        bg = " ".join(w for w in [*words, "background"] if w)
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    if not bg and ("{a_bg}" in template or template.startswith("{bg}")):
        template = _TEMPLATES[0]
    text = template.format(
        a="{a}", a_bg="{a_bg}", size=size, colour=scene.colour, shape=scene.shape, pos=pos, bg=bg
    )
    # tidy up the holes left by dropped parts, then fill in the articles
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(,\s*)+,", ",", text)
    text = re.sub(r"\s+,", ",", text).strip().strip(",").strip()
    text = re.sub(r"\bwith \{a_bg\}\s*$|\bon \{a_bg\}\s*$|\band \{a_bg\}\s*$", "", text).strip()
    words = text.split(" ")
    for i, w in enumerate(words):
        if w in ("{a}", "{a_bg}"):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            words[i] = _article(nxt)
    text = " ".join(words).strip().strip(",").strip()
    return re.sub(r"\s+", " ", text)


def sample(seed: int, index: int) -> tuple[Image.Image, str, Scene]:
    """The ``index``-th sample of the stream with ``seed``: (image, random caption, scene)."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    return render(scene), caption(scene, rng), scene


def batch(seed: int, start: int, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Samples ``start .. start+n`` as a float32 array (n, 3, 64, 64) in [-1, 1]."""
    imgs, caps, scenes = [], [], []
    for i in range(start, start + n):
        img, cap, sc = sample(seed, i)
        imgs.append(np.asarray(img, dtype=np.float32))
        caps.append(cap)
        scenes.append(sc)
    arr = np.stack(imgs).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return arr.astype(np.float32), caps, scenes


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into ``list(COLOURS)`` of the nearest named colour for each pixel (..., 3)."""
    table = np.array(list(COLOURS.values()), np.float32)
    d = np.linalg.norm(pixels.astype(np.float32)[..., None, :] - table, axis=-1)
    return d.argmin(-1)
