"""Procedural drawing of the toy world: subjects, styles and the base model's generic shapes (PIL only).

Every picture is a list of *parts* (a soft mask and a colour) laid out in a canonical 64x64 frame,
posed (rotation, scale, position, mirror) by one affine transform, then *rendered*: neutrally (flat
colours on a light grey ground) or in a style (a function of the ground and the posed parts). Images are
drawn at 64x64 and downsampled to the world's size (32x32) with antialiasing. Everything is a pure
function of a seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

CANVAS = 64  # drawing resolution; images are downsampled from it
NEUTRAL_GROUND = (200, 200, 200)

Part = tuple[Image.Image, tuple[int, int, int]]  # (mask "L" CANVAS x CANVAS, rgb)


def _mask() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    m = Image.new("L", (CANVAS, CANVAS), 0)
    return m, ImageDraw.Draw(m)


def _part(draw_fn: Callable[[ImageDraw.ImageDraw], None], rgb: tuple[int, int, int]) -> Part:
    m, d = _mask()
    draw_fn(d)
    return m, rgb


# ---- subjects: distinct objects with their own shape, parts and colours (canonical frame 64x64) ----


def _house() -> list[Part]:
    return [
        _part(lambda d: d.rectangle((16, 30, 48, 54), fill=255), (235, 200, 60)),
        _part(lambda d: d.polygon([(10, 31), (32, 10), (54, 31)], fill=255), (190, 40, 40)),
        _part(lambda d: d.rectangle((28, 40, 36, 54), fill=255), (90, 50, 20)),
        _part(lambda d: d.rectangle((19, 34, 25, 40), fill=255), (120, 190, 240)),
    ]


def _tree() -> list[Part]:
    return [
        _part(lambda d: d.rectangle((28, 36, 36, 58), fill=255), (110, 70, 30)),
        _part(lambda d: d.ellipse((12, 6, 52, 42), fill=255), (40, 150, 50)),
    ]


def _car() -> list[Part]:
    return [
        _part(lambda d: d.rectangle((6, 28, 58, 44), fill=255), (40, 80, 210)),
        _part(lambda d: d.polygon([(18, 28), (24, 16), (42, 16), (48, 28)], fill=255), (40, 80, 210)),
        _part(lambda d: d.polygon([(24, 27), (27, 19), (39, 19), (43, 27)], fill=255), (170, 220, 250)),
        _part(
            lambda d: (d.ellipse((12, 38, 24, 50), fill=255), d.ellipse((40, 38, 52, 50), fill=255)),
            (25, 25, 25),
        ),
    ]


def _mushroom() -> list[Part]:
    return [
        _part(lambda d: d.rectangle((26, 32, 38, 56), fill=255), (240, 225, 190)),
        _part(lambda d: d.pieslice((8, 10, 56, 54), 180, 360, fill=255), (210, 30, 30)),
        _part(
            lambda d: [
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=255)
                for x, y in ((20, 24), (32, 17), (44, 24), (28, 28))
            ],
            (250, 250, 250),
        ),
    ]


def _snowman() -> list[Part]:
    return [
        _part(
            lambda d: (d.ellipse((16, 32, 48, 60), fill=255), d.ellipse((21, 14, 43, 36), fill=255)),
            (245, 245, 250),
        ),
        _part(lambda d: d.rectangle((22, 4, 42, 16), fill=255), (30, 30, 30)),
        _part(lambda d: d.polygon([(32, 24), (44, 27), (32, 29)], fill=255), (250, 130, 20)),
    ]


def _fish() -> list[Part]:
    return [
        _part(lambda d: d.ellipse((8, 20, 46, 44), fill=255), (250, 140, 20)),
        _part(lambda d: d.polygon([(42, 32), (58, 18), (58, 46)], fill=255), (240, 90, 10)),
        _part(lambda d: d.ellipse((15, 27, 21, 33), fill=255), (20, 20, 60)),
    ]


def _rocket() -> list[Part]:
    return [
        _part(lambda d: d.rectangle((24, 18, 40, 50), fill=255), (185, 185, 195)),
        _part(lambda d: d.polygon([(24, 19), (32, 4), (40, 19)], fill=255), (220, 30, 60)),
        _part(
            lambda d: (
                d.polygon([(24, 38), (14, 54), (24, 50)], fill=255),
                d.polygon([(40, 38), (50, 54), (40, 50)], fill=255),
            ),
            (220, 30, 60),
        ),
        _part(lambda d: d.ellipse((28, 24, 36, 32), fill=255), (60, 120, 220)),
    ]


def _flower() -> list[Part]:
    def petals(d: ImageDraw.ImageDraw) -> None:
        for k in range(6):
            a = k * math.pi / 3
            x, y = 32 + 12 * math.cos(a), 24 + 12 * math.sin(a)
            d.ellipse((x - 7, y - 7, x + 7, y + 7), fill=255)

    return [
        _part(lambda d: d.rectangle((30, 30, 34, 60), fill=255), (40, 140, 40)),
        _part(petals, (235, 80, 180)),
        _part(lambda d: d.ellipse((26, 18, 38, 30), fill=255), (250, 220, 30)),
    ]


def _mug() -> list[Part]:
    return [
        _part(lambda d: d.ellipse((36, 24, 56, 46), outline=255, width=5), (20, 150, 150)),
        _part(lambda d: d.rectangle((12, 16, 42, 54), fill=255), (20, 150, 150)),
        _part(lambda d: d.rectangle((12, 16, 42, 21), fill=255), (90, 50, 30)),
    ]


def _star() -> list[Part]:
    pts = []
    for k in range(10):
        r = 26 if k % 2 == 0 else 11
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((32 + r * math.cos(a), 33 + r * math.sin(a)))
    return [
        _part(lambda d: d.polygon(pts, fill=255), (250, 200, 20)),
        _part(lambda d: d.ellipse((26, 28, 38, 40), fill=255), (240, 120, 20)),
    ]


SUBJECTS: dict[str, Callable[[], list[Part]]] = {
    "house": _house, "tree": _tree, "car": _car, "mushroom": _mushroom, "snowman": _snowman,
    "fish": _fish, "rocket": _rocket, "flower": _flower, "mug": _mug, "star": _star,
}  # fmt: skip

# ---- generic shapes (the base model's training world and the objects style images show) ----

GENERIC_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 180), "orange": (245, 140, 20), "black": (25, 25, 25), "white": (250, 250, 250),
}  # fmt: skip


def _generic(name: str) -> Callable[[ImageDraw.ImageDraw], None]:
    shapes = {
        "circle": lambda d: d.ellipse((12, 12, 52, 52), fill=255),
        "square": lambda d: d.rectangle((14, 14, 50, 50), fill=255),
        "triangle": lambda d: d.polygon([(32, 8), (56, 54), (8, 54)], fill=255),
        "ring": lambda d: d.ellipse((10, 10, 54, 54), outline=255, width=9),
        "cross": lambda d: (d.rectangle((26, 8, 38, 56), fill=255), d.rectangle((8, 26, 56, 38), fill=255)),
        "diamond": lambda d: d.polygon([(32, 6), (56, 32), (32, 58), (8, 32)], fill=255),
        "bar": lambda d: d.rectangle((6, 24, 58, 40), fill=255),
        "heart": lambda d: (
            d.ellipse((10, 12, 34, 36), fill=255),
            d.ellipse((30, 12, 54, 36), fill=255),
            d.polygon([(12, 28), (52, 28), (32, 56)], fill=255),
        ),
    }
    return shapes[name]


GENERIC_SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "bar", "heart")


def generic_parts(shape: str, colour: str) -> list[Part]:
    return [_part(_generic(shape), GENERIC_COLOURS[colour])]


# ---- pose and rendering ----


@dataclass(frozen=True)
class Pose:
    angle: float = 0.0  # degrees
    scale: float = 1.0
    dx: float = 0.0  # pixels of CANVAS
    dy: float = 0.0
    mirror: bool = False

    @staticmethod
    def random(rng: random.Random, amount: float = 1.0) -> Pose:
        return Pose(
            angle=rng.uniform(-25, 25) * amount,
            scale=1.0 + rng.uniform(-0.3, 0.1) * amount,
            dx=rng.uniform(-8, 8) * amount,
            dy=rng.uniform(-8, 8) * amount,
            mirror=rng.random() < 0.5 * amount,
        )


def pose_parts(parts: list[Part], pose: Pose) -> list[Part]:
    """The parts moved by ``pose``: rotate + scale about the centre, translate, optionally mirror."""
    c = CANVAS / 2
    a = math.radians(pose.angle)
    cos, sin = math.cos(a) / pose.scale, math.sin(a) / pose.scale
    sx = -1.0 if pose.mirror else 1.0
    ox, oy = c + pose.dx, c + pose.dy
    # inverse map: p_in = c + S^-1 R^-1 (p_out - o)
    data = (sx * cos, sx * sin, c - sx * (cos * ox + sin * oy), -sin, cos, c - (-sin * ox + cos * oy))
    out = []
    for mask, rgb in parts:
        out.append((mask.transform((CANVAS, CANVAS), Image.AFFINE, data, resample=Image.BILINEAR), rgb))
    return out


def _compose(ground: tuple[int, int, int], parts: list[tuple[Image.Image, Image.Image]]) -> Image.Image:
    """Paint each (mask, fill image) over a flat ground, in order."""
    img = Image.new("RGB", (CANVAS, CANVAS), ground)
    for mask, fill in parts:
        img.paste(fill, (0, 0), mask)
    return img


def _flat(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (CANVAS, CANVAS), rgb)


def render_neutral(parts: list[Part], ground: tuple[int, int, int] = NEUTRAL_GROUND) -> Image.Image:
    return _compose(ground, [(m, _flat(rgb)) for m, rgb in parts])


def _pattern(fn: Callable[[int, int], bool], on: tuple, off: tuple) -> Image.Image:
    img = Image.new("RGB", (CANVAS, CANVAS), off)
    px = img.load()
    for y in range(CANVAS):
        for x in range(CANVAS):
            if fn(x, y):
                px[x, y] = on
    return img


def _mix(a: tuple, b: tuple, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _edges(mask: Image.Image, width: int) -> Image.Image:
    inner = mask.filter(ImageFilter.MinFilter(2 * width + 1))
    return ImageChops.subtract(mask, inner)


def _union(parts: list[Part]) -> Image.Image:
    u = Image.new("L", (CANVAS, CANVAS), 0)
    for m, _ in parts:
        u = ImageChops.lighter(u, m)
    return u


def _stripes(parts: list[Part]) -> Image.Image:
    return _compose((235, 235, 220), [
        (m, _pattern(lambda x, y: (x + y) // 6 % 2 == 0, rgb, (250, 250, 250))) for m, rgb in parts
    ])  # fmt: skip


def _checker(parts: list[Part]) -> Image.Image:
    return _compose((210, 230, 210), [
        (m, _pattern(lambda x, y: (x // 8 + y // 8) % 2 == 0, rgb, _mix(rgb, (0, 0, 0), 0.7)))
        for m, rgb in parts
    ])  # fmt: skip


def _neon(parts: list[Part]) -> Image.Image:
    img = _compose((10, 10, 30), [(_edges(m, 3), _flat(_mix(rgb, (255, 255, 255), 0.2))) for m, rgb in parts])
    glow = img.filter(ImageFilter.GaussianBlur(2))
    return ImageChops.lighter(img, glow)


def _sketch(parts: list[Part]) -> Image.Image:
    paper = (245, 240, 225)
    lines = [(_edges(m, 2), _flat((40, 40, 40))) for m, _ in parts]
    hatch = _pattern(lambda x, y: (x - y) % 7 == 0, (120, 120, 120), paper)
    return _compose(paper, [(_union(parts), hatch), *lines])


def _pastel(parts: list[Part]) -> Image.Image:
    img = _compose((250, 215, 230), [(m, _flat(_mix(rgb, (255, 255, 255), 0.6))) for m, rgb in parts])
    return img.filter(ImageFilter.SMOOTH_MORE)


def _negative(parts: list[Part]) -> Image.Image:
    return ImageOps.invert(render_neutral(parts))


def _dots(parts: list[Part]) -> Image.Image:
    dot = lambda x, y: (x % 10 - 5) ** 2 + (y % 10 - 5) ** 2 <= 9  # noqa: E731
    return _compose((200, 225, 250), [(m, _pattern(dot, rgb, (255, 255, 255))) for m, rgb in parts])


def _blur(parts: list[Part]) -> Image.Image:
    return render_neutral(parts, (170, 190, 160)).filter(ImageFilter.GaussianBlur(4))


def _mosaic(parts: list[Part]) -> Image.Image:
    small = render_neutral(parts, (230, 200, 150)).resize((8, 8), Image.BILINEAR)
    return small.resize((CANVAS, CANVAS), Image.NEAREST)


def _sepia(parts: list[Part]) -> Image.Image:
    grey = ImageOps.grayscale(render_neutral(parts, (225, 215, 190)))
    img = ImageOps.colorize(grey, black=(50, 25, 5), white=(250, 225, 170))
    return Image.composite(_flat((20, 10, 0)), img, _edges(_union(parts), 3))


STYLES: dict[str, Callable[[list[Part]], Image.Image]] = {
    "stripes": _stripes, "checker": _checker, "neon": _neon, "sketch": _sketch, "pastel": _pastel,
    "negative": _negative, "dots": _dots, "blur": _blur, "mosaic": _mosaic, "sepia": _sepia,
}  # fmt: skip


def finish(img: Image.Image, size: int) -> Image.Image:
    """Downsample a CANVAS-sized drawing to ``size`` x ``size`` (antialiased)."""
    return img.resize((size, size), Image.LANCZOS) if size != CANVAS else img


def subject_image(name: str, rng: random.Random, size: int = 32) -> Image.Image:
    """The subject ``name`` in a random pose, rendered neutrally."""
    return finish(render_neutral(pose_parts(SUBJECTS[name](), Pose.random(rng))), size)


def style_sample(name: str, rng: random.Random, size: int = 32) -> tuple[Image.Image, str]:
    """A random generic shape of a random colour, posed at random, rendered in style ``name``, and what it
    shows in the base model's words (``"red circle"``)."""
    shape = rng.choice(GENERIC_SHAPES)
    colour = rng.choice([c for c in GENERIC_COLOURS if c != "white"])
    img = finish(STYLES[name](pose_parts(generic_parts(shape, colour), Pose.random(rng))), size)
    return img, f"{colour} {shape}"


def style_image(name: str, rng: random.Random, size: int = 32) -> Image.Image:
    """`style_sample`'s picture alone."""
    return style_sample(name, rng, size)[0]


def styled_subject(subject: str, style: str, rng: random.Random, size: int = 32) -> Image.Image:
    """The subject drawn in the style: what a good merge should look like (for eyes and plots)."""
    return finish(STYLES[style](pose_parts(SUBJECTS[subject](), Pose.random(rng, 0.3))), size)


def base_sample(rng: random.Random, size: int = 32) -> tuple[Image.Image, str]:
    """One training picture of the base model and its caption: a generic shape, flat colour, pale
    ground of a random tint, random pose; caption ``"a red circle"``."""
    shape = rng.choice(GENERIC_SHAPES)
    colour = rng.choice(list(GENERIC_COLOURS))
    ground = tuple(rng.randint(150, 235) for _ in range(3))
    img = render_neutral(pose_parts(generic_parts(shape, colour), Pose.random(rng)), ground)  # type: ignore[arg-type]
    return finish(img, size), f"a {colour} {shape}"


def styled_base_sample(style: str, rng: random.Random, size: int = 32) -> tuple[Image.Image, str]:
    """One styled training picture of the base model: `style_sample`'s, captioned in the base's words with
    the style's own name (``"a red circle in stripes style"``)."""
    img, shows = style_sample(style, rng, size)
    return img, f"a {shows} in {style} style"
