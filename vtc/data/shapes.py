"""Procedural shapes: images of coloured shapes with a small printed digit, and short-answer questions.

Every example is drawn from its own seed ``(BASE_SEED, split, index)``, so the data needs no files,
is the same on every machine, and the splits cannot overlap. An image (64 x 64 RGB, 256 patches of
4 x 4 pixels) is a 3 x 3 grid of cells on a dark background (flat, gradient, noise or stripes):
2 to 6 cells hold a shape (one of five kinds, one of six colours, radius 3.5 to 9.5 px, centred in
its cell; diamonds and triangles may reach up to 2 px past the cell's edge) and one
holds a digit printed 6 x 10 px in a 3 x 5 pixel font, the small detail that aggressive token
reduction loses first.

Questions (one type per example, cycling through :data:`QUESTION_TYPES` by index, answers balanced):

- ``color``: "what color is the triangle ?" (a kind that appears once) -> ``red``
- ``count``: "how many blue shapes are there ?" -> ``0`` .. ``3``
- ``presence``: "is there a green circle ?" -> ``yes`` / ``no`` (half each)
- ``position``: "what shape is at the top left ?" -> ``square``
- ``digit``: "what number is written ?" -> ``0`` .. ``9``

The classification view (:func:`classification`) labels the same images by their digit (10 classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
GRID = 3
BASE_SEED = 20261126
SPLITS = {"train": (0, 1_000_000), "val": (1, 2_000), "test": (2, 2_000)}  # split -> (stream, size)
QUESTION_TYPES = ("color", "count", "presence", "position", "digit")
KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235),
    "yellow": (235, 215, 40), "purple": (160, 70, 210), "orange": (245, 140, 30),
}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
MAX_COUNT = 3
PROMPT = "USER: <image>\n{question} ASSISTANT:"

_FONT = {  # 3 x 5 bitmaps, rows top to bottom
    0: ("111", "101", "101", "101", "111"), 1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"), 3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"), 5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"), 7: ("111", "001", "010", "010", "010"),
    8: ("111", "101", "111", "101", "111"), 9: ("111", "101", "111", "001", "111"),
}
_DIGIT_SCALE = 2
_EDGES = np.round(np.arange(GRID + 1) * IMAGE_SIZE / GRID).astype(int)  # cell borders: 0, 21, 43, 64


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: int  # 0..8, raster order
    center: tuple[float, float]  # (x, y) in pixels
    radius: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    digit: int
    digit_cell: int
    digit_origin: tuple[int, int]  # top-left pixel (x, y) of the printed digit


@dataclass(frozen=True)
class Example:
    """One image with its question; ``objects`` maps each pixel to 0 (background), 1..n (the
    scene's shapes in order) or n + 1 (the digit)."""

    split: str
    index: int
    image: np.ndarray  # (64, 64, 3) uint8
    objects: np.ndarray  # (64, 64) int8
    scene: Scene
    qtype: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    @property
    def label(self) -> int:
        """The classification label: the printed digit."""
        return self.scene.digit


def vocabulary() -> list[str]:
    """Every word a prompt or an answer can contain (for a word-level tokenizer)."""
    words = "USER ASSISTANT : ? what color is the how many shape shapes are there a at number written yes no".split()
    words += list(KINDS) + list(COLORS) + [str(d) for d in range(10)]
    words += [w for cell in CELLS for w in cell.split()]
    return list(dict.fromkeys(words))


def check_split(split: str, index: int | None = None) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    size = SPLITS[split][1]
    if index is not None and not 0 <= index < size:
        raise ValueError(f"index {index} outside the {split} split (0 .. {size - 1})")


def check_qtypes(qtypes: tuple[str, ...] | list[str]) -> None:
    unknown = [q for q in qtypes if q not in QUESTION_TYPES]
    if unknown or not qtypes:
        raise ValueError(f"unknown question type(s) {unknown or qtypes!r}; choose from {', '.join(QUESTION_TYPES)}")


def example(split: str, index: int) -> Example:
    """The ``index``-th example of ``split``; its question type is ``QUESTION_TYPES[index % 5]``."""
    check_split(split, index)
    rng = np.random.default_rng([BASE_SEED, SPLITS[split][0], index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    scene, question, answer = _ASK[qtype](rng)
    image, objects = render(scene, rng)
    return Example(split, index, image, objects, scene, qtype, question, answer)


def examples(split: str, count: int, start: int = 0, qtypes: tuple[str, ...] | list[str] = QUESTION_TYPES) -> list[Example]:
    """``count`` examples of ``split`` from index ``start`` on, keeping only the question types asked
    for (indices are skipped, not re-drawn, so a subset of types is a subset of the split)."""
    check_split(split)
    check_qtypes(qtypes)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    wanted = [i for i in range(start, SPLITS[split][1]) if QUESTION_TYPES[i % len(QUESTION_TYPES)] in qtypes]
    if count > len(wanted):
        raise ValueError(f"the {split} split has {len(wanted)} examples of types {list(qtypes)} from index "
                         f"{start}; asked for {count}")
    return [example(split, i) for i in wanted[:count]]


def classification(split: str, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classification view: (count, 64, 64, 3) uint8 images and their digit labels (count,)."""
    chosen = examples(split, count, start)
    return np.stack([e.image for e in chosen]), np.array([e.label for e in chosen], dtype=np.int64)


# ----- scenes ----------------------------------------------------------------------------------------
def _random_scene(rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    n = int(rng.integers(2, 7)) if n_shapes is None else n_shapes
    cells = rng.permutation(GRID * GRID)
    shapes = []
    for cell in cells[:n]:
        radius = float(rng.uniform(3.5, 9.5))
        shapes.append(Shape(KINDS[rng.integers(len(KINDS))], list(COLORS)[rng.integers(len(COLORS))], int(cell),
                            _place(rng, int(cell), radius), radius))
    digit_cell = int(cells[n])
    x0, x1, y0, y1 = _cell_box(digit_cell)
    w, h = 3 * _DIGIT_SCALE, 5 * _DIGIT_SCALE
    origin = (int(rng.integers(x0 + 1, x1 - w)), int(rng.integers(y0 + 1, y1 - h)))
    return Scene(tuple(shapes), int(rng.integers(10)), digit_cell, origin)


def _cell_box(cell: int) -> tuple[int, int, int, int]:
    row, col = divmod(cell, GRID)
    return _EDGES[col], _EDGES[col + 1], _EDGES[row], _EDGES[row + 1]


def _place(rng: np.random.Generator, cell: int, radius: float) -> tuple[float, float]:
    x0, x1, y0, y1 = _cell_box(cell)
    margin = radius + 0.5
    return float(rng.uniform(x0 + margin, x1 - margin)), float(rng.uniform(y0 + margin, y1 - margin))


def _recolor(scene: Scene, colors: list[str]) -> Scene:
    shapes = tuple(Shape(s.kind, c, s.cell, s.center, s.radius) for s, c in zip(scene.shapes, colors))
    return Scene(shapes, scene.digit, scene.digit_cell, scene.digit_origin)


def _rekind(scene: Scene, kinds: list[str]) -> Scene:
    shapes = tuple(Shape(k, s.color, s.cell, s.center, s.radius) for s, k in zip(scene.shapes, kinds))
    return Scene(shapes, scene.digit, scene.digit_cell, scene.digit_origin)


def _ask_color(rng: np.random.Generator) -> tuple[Scene, str, str]:
    scene = _random_scene(rng)
    target = int(rng.integers(len(scene.shapes)))
    kind = scene.shapes[target].kind
    others = [k for k in KINDS if k != kind]
    kinds = [kind if i == target else (s.kind if s.kind != kind else others[rng.integers(len(others))])
             for i, s in enumerate(scene.shapes)]
    scene = _rekind(scene, kinds)
    return scene, f"what color is the {kind} ?", scene.shapes[target].color


def _ask_count(rng: np.random.Generator) -> tuple[Scene, str, str]:
    count = int(rng.integers(MAX_COUNT + 1))
    scene = _random_scene(rng, int(rng.integers(max(2, count), 7)))
    color = list(COLORS)[rng.integers(len(COLORS))]
    others = [c for c in COLORS if c != color]
    chosen = set(rng.permutation(len(scene.shapes))[:count].tolist())
    colors = [color if i in chosen else others[rng.integers(len(others))] for i in range(len(scene.shapes))]
    return _recolor(scene, colors), f"how many {color} shapes are there ?", str(count)


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A ``qtype`` question about an existing scene and its answer, or None when the scene has no
    such question (``color`` needs a kind that appears once). Answers are not balanced here
    (counts follow the scene); :func:`example` balances them by drawing the scene to fit."""
    check_qtypes([qtype])
    if qtype == "color":
        kinds = [s.kind for s in scene.shapes]
        unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
        if not unique:
            return None
        shape = unique[rng.integers(len(unique))]
        return f"what color is the {shape.kind} ?", shape.color
    if qtype == "count":
        present = sorted({s.color for s in scene.shapes})
        color = present[rng.integers(len(present))] if rng.random() < 0.5 else list(COLORS)[rng.integers(len(COLORS))]
        return f"how many {color} shapes are there ?", str(sum(s.color == color for s in scene.shapes))
    if qtype == "presence":
        if rng.random() < 0.5:
            shape = scene.shapes[rng.integers(len(scene.shapes))]
            return f"is there a {shape.color} {shape.kind} ?", "yes"
        present = {(s.color, s.kind) for s in scene.shapes}
        absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        color, kind = absent[rng.integers(len(absent))]
        return f"is there a {color} {kind} ?", "no"
    if qtype == "position":
        shape = scene.shapes[rng.integers(len(scene.shapes))]
        return f"what shape is at the {CELLS[shape.cell]} ?", shape.kind
    return "what number is written ?", str(scene.digit)


def evidence(scene: Scene, qtype: str, question: str) -> list[int]:
    """The objects a question is about, as numbers of the object map (1..n the shapes, n + 1 the
    digit): the shape named, the shapes counted or matched, the shape in the cell, the digit.
    Empty when nothing in the image answers it (a count of 0, a "no")."""
    check_qtypes([qtype])
    words = question.removesuffix(" ?").split()
    numbered = list(enumerate(scene.shapes, start=1))
    if qtype == "color":
        return [i for i, s in numbered if s.kind == words[-1]]
    if qtype == "count":
        return [i for i, s in numbered if s.color == words[2]]
    if qtype == "presence":
        return [i for i, s in numbered if (s.color, s.kind) == (words[3], words[4])]
    if qtype == "position":
        cell = CELLS.index(" ".join(words[5:]))
        return [i for i, s in numbered if s.cell == cell]
    return [len(scene.shapes) + 1]


def _ask_unconstrained(qtype: str):
    def draw(rng: np.random.Generator) -> tuple[Scene, str, str]:
        scene = _random_scene(rng)
        return (scene, *ask(scene, qtype, rng))
    return draw


_ASK = {"color": _ask_color, "count": _ask_count, "presence": _ask_unconstrained("presence"),
        "position": _ask_unconstrained("position"), "digit": _ask_unconstrained("digit")}


# ----- rendering -------------------------------------------------------------------------------------
def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(15, 95, size=3) * rng.uniform(0.6, 1.0, size=3)  # dark, low saturation
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) / IMAGE_SIZE
    style = rng.integers(4)
    if style == 1:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * x + np.sin(angle) * y
        image = base + rng.uniform(-35, 35, size=3) * ramp[..., None]
    elif style == 2:  # noise texture
        image = base + rng.normal(0, rng.uniform(4, 12), size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    elif style == 3:  # faint stripes
        period = rng.uniform(4, 12)
        stripes = np.sin(2 * np.pi * (x if rng.random() < 0.5 else y) * IMAGE_SIZE / period)
        image = base + rng.uniform(5, 15) * stripes[..., None]
    else:  # flat
        image = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    return image


def _mask(shape: Shape) -> np.ndarray:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx, dy, r = x - shape.center[0], y - shape.center[1], shape.radius
    if shape.kind == "circle":
        return dx * dx + dy * dy <= r * r
    if shape.kind == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape.kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape.kind == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.6)
    arm = max(0.33 * r, 1.0)  # cross
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The scene as a (64, 64, 3) uint8 image and its (64, 64) object map; ``rng`` draws the
    background and the colour jitter."""
    image = _background(rng)
    objects = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int8)
    for number, shape in enumerate(scene.shapes, start=1):
        mask = _mask(shape)
        image[mask] = np.asarray(COLORS[shape.color]) + rng.uniform(-15, 15, size=3)
        objects[mask] = number
    glyph = np.array([[c == "1" for c in row] for row in _FONT[scene.digit]])
    glyph = np.kron(glyph, np.ones((_DIGIT_SCALE, _DIGIT_SCALE), dtype=bool))
    x, y = scene.digit_origin
    region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    region[y:y + glyph.shape[0], x:x + glyph.shape[1]] = glyph
    image[region] = rng.uniform(225, 250)
    objects[region] = len(scene.shapes) + 1
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects
