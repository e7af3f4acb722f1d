"""The picture of an explanation, drawn with Pillow and numpy (no plotting library).

Layout, left to right: the input as the model saw it (resized and center-cropped), then
one panel per map (class token; for a distilled model the distillation token beside it),
each the map upsampled (bilinear) over the input in viridis, with a colour bar under it
whose ends give the map's own minimum and maximum. A token with a note (a distillation
token no teacher trained) has it written across the top of its panel, on a dark band. Every panel is S x S, where S is the
model's input size scaled by a whole factor to at least 224 px (224 for 224-px models);
panels are GAP px apart. With per-head maps, one row per token follows: the last block's
heads as panels of S//2. A caption at the bottom names the image, the method, the model
and the top classes with their probabilities.

    width  = (1 + tokens)·S + (2 + tokens)·GAP   (wider if the per-head rows need it)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_PANEL = 224
GAP = 8
LINE = 18  # px per line of text
FONT_SIZE = 13
BAR = 10  # colour bar height
ALPHA = 0.5  # weight of the colour map over the image
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)

# viridis (matplotlib's perceptually uniform map, CC0), sampled at every 16th of its 256
# entries and the last; the table in between is linear interpolation (within 1/255 of it).
_VIRIDIS_ANCHORS = np.array(
    [
        [0.267004, 0.004874, 0.329415],
        [0.282327, 0.094955, 0.417331],
        [0.278826, 0.175490, 0.483397],
        [0.258965, 0.251537, 0.524736],
        [0.229739, 0.322361, 0.545706],
        [0.199430, 0.387607, 0.554642],
        [0.172719, 0.448791, 0.557885],
        [0.149039, 0.508051, 0.557250],
        [0.127568, 0.566949, 0.550556],
        [0.120638, 0.625828, 0.533488],
        [0.157851, 0.683765, 0.501686],
        [0.246070, 0.738910, 0.452024],
        [0.369214, 0.788888, 0.382914],
        [0.515992, 0.831158, 0.294279],
        [0.678489, 0.863742, 0.189503],
        [0.845561, 0.887322, 0.099702],
        [0.993248, 0.906157, 0.143936],
    ]
)
_ANCHOR_AT = np.array([*range(0, 256, 16), 255], dtype=np.float64)


def _colour_table() -> np.ndarray:
    idx = np.arange(256, dtype=np.float64)
    cols = [np.interp(idx, _ANCHOR_AT, _VIRIDIS_ANCHORS[:, c]) for c in range(3)]
    return np.rint(np.stack(cols, axis=1) * 255).astype(np.uint8)  # (256, 3)


VIRIDIS = _colour_table()
TOKEN_TITLES = {"cls": "class token", "dist": "distillation token"}
METHOD_TITLES = {"rollout": "attention rollout", "attention": "last-block attention"}


def panel_size(image_size: int) -> int:
    """S: the input size times the smallest whole factor that makes it at least 224 px."""
    return image_size * max(1, math.ceil(MIN_PANEL / image_size))


def scale_map(m: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A map to [0, 1] by its own range: (scaled, min, max). A constant map is 0.5."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return np.full(m.shape, 0.5), lo, hi
    return (m - lo) / (hi - lo), lo, hi


def colourise(scaled: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> viridis RGB (H, W, 3) uint8."""
    return VIRIDIS[np.clip(np.rint(np.asarray(scaled) * 255), 0, 255).astype(np.intp)]


def overlay(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """The map upsampled (bilinear) to size x size over the image (scaled to size, nearest)."""
    scaled, _, _ = scale_map(m)
    up = Image.fromarray(scaled.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    colours = colourise(np.asarray(up)).astype(np.float32)
    base = np.asarray(_scaled_input(image, size), dtype=np.float32)
    return np.rint((1 - ALPHA) * base + ALPHA * colours).astype(np.uint8)


def _scaled_input(image: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB")
    return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.NEAREST)


@dataclass(frozen=True)
class Layout:
    """Where everything goes (boxes are (left, top, right, bottom))."""

    size: tuple[int, int]  # (width, height) of the picture
    input_box: tuple[int, int, int, int]
    map_boxes: list[tuple[int, int, int, int]]  # one per token
    bar_boxes: list[tuple[int, int, int, int]]  # the colour bar under each map
    head_boxes: list[list[tuple[int, int, int, int]]]  # per token, per head
    caption_top: int


def layout(image_size: int, tokens: int, heads: int = 0, caption_lines: int = 1) -> Layout:
    """The picture's geometry for a model input size, number of maps, per-head maps
    (0: none) and lines of caption."""
    S, g = panel_size(image_size), GAP
    width = (1 + tokens) * S + (2 + tokens) * g
    t = S // 2
    if heads:
        width = max(width, heads * t + (heads + 1) * g)
    top = g + LINE  # a title line over the panels
    input_box = (g, top, g + S, top + S)
    map_boxes = [(g + (1 + j) * (S + g), top, g + (1 + j) * (S + g) + S, top + S) for j in range(tokens)]
    bar_top = top + S + 4
    bar_boxes = [(x0, bar_top, x1, bar_top + BAR) for x0, _, x1, _ in map_boxes]
    y = bar_top + BAR + LINE + g  # the bar's numbers under it
    head_boxes = []
    if heads:
        for _ in range(tokens):
            y += LINE  # the row's title
            head_boxes.append([(g + h * (t + g), y, g + h * (t + g) + t, y + t) for h in range(heads)])
            y += t + g
    caption_top = y
    height = caption_top + caption_lines * LINE + g
    return Layout((width, height), input_box, map_boxes, bar_boxes, head_boxes, caption_top)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """`text`, cut with an ellipsis to fit `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _range(lo: float, hi: float) -> tuple[str, str]:
    """The two ends, with as many significant digits (3 to 6) as it takes to tell them apart."""
    for digits in range(3, 7):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b:
            break
    return a, b


def caption_lines(title: str | None, method: str, predictions: Sequence, model: str | None) -> list[str]:
    what = METHOD_TITLES.get(method, method)
    first = " · ".join(x for x in (title, what, model) if x)
    if not predictions:
        return [first, "no classifier head: no labels"]
    return [first] + [f"{p.rank}. {p.label}  {p.score * 100:.1f}%" for p in predictions]


def _band(pic: Image.Image, box: tuple[int, int, int, int], text: str, font) -> None:
    """`text` in white on a dark band across the top of the panel `box`."""
    x0, y0, x1, _ = box
    band = (x0, y0, x1, y0 + LINE + 2)
    dark = np.asarray(pic.crop(band), dtype=np.float32) * 0.25  # the map shows through, dimmed
    pic.paste(Image.fromarray(dark.astype(np.uint8)), band[:2])
    draw = ImageDraw.Draw(pic)
    draw.text((x0 + 4, y0 + 2), _fit(draw, text, x1 - x0 - 8, font), fill=(255, 255, 255), font=font)


def render(
    image: np.ndarray,
    maps: np.ndarray,
    tokens: Sequence[str],
    method: str,
    predictions: Sequence = (),
    *,
    heads: np.ndarray | None = None,
    title: str | None = None,
    model: str | None = None,
    notes: Mapping[str, str] | None = None,
) -> Image.Image:
    """The picture for one image: `image` (S0, S0, 3) uint8 as the model saw it, `maps`
    (tokens, grid, grid), optional `heads` (tokens, heads, grid, grid), the top classes;
    `notes`: token name -> a note written on its panel (and over its per-head row)."""
    notes = dict(notes or {})
    size0 = image.shape[0]
    n_heads = heads.shape[1] if heads is not None else 0
    lines = caption_lines(title, method, predictions, model)
    lay = layout(size0, len(tokens), n_heads, len(lines))
    S = lay.input_box[2] - lay.input_box[0]
    pic = Image.new("RGB", lay.size, BACKGROUND)
    draw = ImageDraw.Draw(pic)
    font = _font()

    x0, y0, _, _ = lay.input_box
    pic.paste(_scaled_input(image, S), (x0, y0))
    draw.text(
        (x0, y0 - LINE + 2), _fit(draw, f"input ({size0}x{size0}, as the model saw it)", S, font), fill=INK, font=font
    )
    ramp = colourise(np.linspace(0, 1, S))[None].repeat(BAR, axis=0)  # (BAR, S, 3)
    for j, name in enumerate(tokens):
        box, bar = lay.map_boxes[j], lay.bar_boxes[j]
        pic.paste(Image.fromarray(overlay(image, maps[j], S)), box[:2])
        if name in notes:
            _band(pic, box, notes[name], font)
        label = f"{TOKEN_TITLES.get(name, name)} · {METHOD_TITLES.get(method, method)}"
        draw.text((box[0], box[1] - LINE + 2), _fit(draw, label, S, font), fill=INK, font=font)
        pic.paste(Image.fromarray(ramp), bar[:2])
        _, lo, hi = scale_map(maps[j])
        ny = bar[3] + 2
        if hi - lo > 1e-12 * max(1.0, abs(hi)):
            low, high = _range(lo, hi)
            draw.text((bar[0], ny), f"min {low}", fill=INK, font=font)
            right = f"max {high}"
            draw.text((bar[2] - draw.textlength(right, font=font), ny), right, fill=INK, font=font)
        else:
            draw.text((bar[0], ny), f"uniform: every patch {hi:.3g}", fill=INK, font=font)
    for j, row in enumerate(lay.head_boxes):
        t = row[0][2] - row[0][0]
        name = TOKEN_TITLES.get(tokens[j], tokens[j])
        note = f" ({notes[tokens[j]]})" if tokens[j] in notes else ""
        draw.text(
            (row[0][0], row[0][1] - LINE + 2),
            f"last block, {name}{note}, per head (each to its own range)",
            fill=INK,
            font=font,
        )
        for h, box in enumerate(row):
            pic.paste(Image.fromarray(overlay(image, heads[j, h], t)), box[:2])
            draw.text((box[0] + 3, box[1] + 2), f"{h + 1}", fill=(255, 255, 255), font=font)
    width = lay.size[0] - 2 * GAP
    for i, line in enumerate(lines):
        draw.text((GAP, lay.caption_top + i * LINE), _fit(draw, line, width, font), fill=INK, font=font)
    return pic
