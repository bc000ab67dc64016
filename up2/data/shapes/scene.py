"""Drawing of `shapes` images: textured (muted) backgrounds, rotated shapes, visible masks, COCO polygons.

Everything is driven by a ``numpy.random.Generator``: the same generator state gives the same
image and the same masks. Shapes are rasterised without anti-aliasing, so a visible mask is exactly
the set of pixels painted in the shape's colour.

Coordinates: ``mask[row, col]``; in COCO coordinates pixel ``(col, row)`` covers
``[col, col + 1) x [row, row + 1)``.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import contourpy
import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "Instance",
    "shape_outline",
    "rasterize",
    "render_background",
    "is_simple_region",
    "compose_scene",
    "mask_to_polygons",
    "mask_to_bbox",
    "Sample",
    "render_scene",
    "render_classification_image",
]

MIN_SHAPE_PIXELS = 40  # smaller drawings are not recognisable
CONTRAST_DISTANCE = 60.0  # RGB distance under which a neighbouring pixel "looks the same"
MAX_LOOKALIKE_BORDER = 0.1  # at most this fraction of a shape's outline may border look-alike background


@dataclass
class Instance:
    """One drawn shape.

    Attributes:
        category: 0-based index into the spec's categories.
        color: colour name.
        radius: radius (pixels) of the circle the shape is inscribed in.
        full_mask: (H, W) bool, every pixel the shape covered when drawn.
        mask: (H, W) bool, the pixels still visible once later shapes are drawn.
    """

    category: int
    color: str
    radius: float
    full_mask: np.ndarray
    mask: np.ndarray

    @property
    def area(self) -> int:
        """Visible pixel count."""
        return int(self.mask.sum())

    @property
    def centroid(self) -> Tuple[float, float]:
        """(x, y) centre of the visible pixels, in COCO coordinates."""
        rows, cols = np.nonzero(self.mask)
        return float(cols.mean() + 0.5), float(rows.mean() + 0.5)


def _regular(sides: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def shape_outline(name: str, radius: float, rotation: float) -> np.ndarray:
    """Vertices (K, 2) as (x, y) of shape ``name`` centred at the origin, inside a circle of
    ``radius``, rotated by ``rotation`` radians. Image y points down, so "up" is negative y."""
    r = radius
    if name == "circle":
        points = _regular(64, r, 0.0)
    elif name == "square":
        points = _regular(4, r, math.pi / 4)
    elif name == "triangle":
        points = _regular(3, r, -math.pi / 2)
    elif name == "pentagon":
        points = _regular(5, r, -math.pi / 2)
    elif name == "hexagon":
        points = _regular(6, r, 0.0)
    elif name == "star":
        outer = _regular(5, r, -math.pi / 2)
        inner = _regular(5, 0.47 * r, -math.pi / 2 + math.pi / 5)
        points = np.stack([outer, inner], axis=1).reshape(-1, 2)
    elif name == "diamond":
        points = np.array([[0.0, -r], [0.6 * r, 0.0], [0.0, r], [-0.6 * r, 0.0]])
    elif name == "cross":
        a, b = 0.8 * r, 0.28 * r
        points = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                           [-a, b], [-a, -b], [-b, -b]])
    elif name == "heart":
        t = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
        points = np.stack([x, y], axis=1)
        points *= r / np.linalg.norm(points, axis=1).max()
    elif name == "arrow":
        shaft, head = 0.22 * r, 0.6 * r
        points = np.array([[-r, -shaft], [0.1 * r, -shaft], [0.1 * r, -head], [r, 0.0], [0.1 * r, head],
                           [0.1 * r, shaft], [-r, shaft]])
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of the categories in spec.json")
    c, s = math.cos(rotation), math.sin(rotation)
    return points @ np.array([[c, s], [-s, c]])


def rasterize(vertices: np.ndarray, center: Tuple[float, float], size: int) -> np.ndarray:
    """(size, size) bool mask of the polygon ``vertices + center`` (no anti-aliasing)."""
    canvas = Image.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon((vertices + np.asarray(center)).ravel().tolist(), fill=1)
    return np.asarray(canvas, dtype=bool)


def _random_color(rng: np.random.Generator, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Half the time a darkened/jittered shape colour (so backgrounds share the shapes' hues),
    otherwise any colour."""
    if rng.random() < 0.5:
        base = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float32)
        return base * rng.uniform(0.55, 1.0) + rng.uniform(-20, 20, size=3)
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _muted_colors(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Two close, low-saturation colours: a gray level in [70, 180] tinted by up to 12 per channel, and
    the same shifted by up to 40 (the texture's contrast)."""
    first = rng.uniform(70, 180) + rng.uniform(-12, 12, size=3)
    second = first + rng.uniform(-40, 40) + rng.uniform(-8, 8, size=3)
    return np.clip(first, 0, 255).astype(np.float32), np.clip(second, 0, 255).astype(np.float32)


BACKGROUND_STYLES = ("muted", "vivid")


def render_background(rng: np.random.Generator, size: int, palette: Sequence[Sequence[int]],
                      style: str = "muted") -> Tuple[np.ndarray, int]:
    """A textured background and its kind.

    ``style``: ``"muted"`` (the generator's, since spec version 2): textures of two close low-saturation
    colours, so shapes stand out from them as objects do from a scene, while the texture's edges still
    compete with theirs; ``"vivid"`` (version 1): two colours drawn independently, half the time from
    the shapes' own hues. On vivid backgrounds a plain CNN barely learns the shape classes within
    minutes on a CPU (``tools/shapes_background_study.py``).

    Returns:
        (size, size, 3) uint8 image and the kind: 0 gradient, 1 noisy, 2 striped, 3 checkered
        (the order of ``backgrounds`` in spec.json).
    """
    if style not in BACKGROUND_STYLES:
        raise ValueError(f"unknown background style {style!r}; expected one of {list(BACKGROUND_STYLES)}")
    kind = int(rng.integers(4))
    if style == "muted":
        first, second = _muted_colors(rng)
    else:
        first, second = _random_color(rng, palette), _random_color(rng, palette)
    yy, xx = np.arange(size, dtype=np.float32)[:, None], np.arange(size, dtype=np.float32)[None, :]
    if kind == 0:
        angle = rng.uniform(0, 2 * math.pi)
        t = ((xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)) / size + 0.5
        t = np.clip(t, 0, 1)
        noise = 4.0
    elif kind == 1:
        cells = int(rng.integers(3, 9))
        coarse = Image.fromarray(rng.uniform(0, 1, size=(cells, cells)).astype(np.float32))
        t = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32).clip(0, 1)
        noise = 14.0 if style == "vivid" else 10.0
    elif kind == 2:
        period, angle = rng.uniform(0.06, 0.25) * size, rng.uniform(0, math.pi)
        t = (((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 1.0 < 0.5).astype(np.float32)
        noise = 4.0
    else:
        cell = rng.uniform(0.06, 0.25) * size
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
        noise = 4.0
    image = first * (1 - t[..., None]) + second * t[..., None]
    image = image + noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), kind


def _iso_lines(z: np.ndarray) -> List[np.ndarray]:
    """The closed 0.5 iso-lines of ``z`` (2-D float64) as (K, 2) arrays of (x = column, y = row),
    first point repeated last: ``contourpy.contour_generator(z=z).lines(0.5)``. The generator is
    built directly, skipping the masked-array conversion that dominates the cost on small arrays."""
    rows, cols = z.shape
    x, y = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    try:
        generator = contourpy.SerialContourGenerator(
            x, y, z, None, corner_mask=False, line_type=contourpy.LineType.Separate,
            fill_type=contourpy.FillType.OuterOffset, quad_as_tri=False, z_interp=contourpy.ZInterp.Linear,
            x_chunk_size=0, y_chunk_size=0)
    except TypeError:  # another contourpy version: use the public factory
        generator = contourpy.contour_generator(z=z, name="serial", line_type=contourpy.LineType.Separate)
    return generator.lines(0.5)


def _crop(mask: np.ndarray) -> Optional[np.ndarray]:
    """The mask's bounding crop padded by one empty pixel, or None when the mask is empty."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    r0, r1 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    c0, c1 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    crop = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=bool)
    crop[1:-1, 1:-1] = mask[r0:r1, c0:c1]
    return crop


def is_simple_region(mask: np.ndarray) -> bool:
    """True when ``mask`` is one piece without holes whose outline is one simple curve: no two
    pixels touch only at a corner (so 4- and 8-connectivity agree) and the 0.5 iso-line of the mask
    is a single closed line."""
    crop = _crop(mask)
    if crop is None:
        return False
    a, b, c, d = crop[:-1, :-1], crop[:-1, 1:], crop[1:, :-1], crop[1:, 1:]
    if np.any((a & d & ~b & ~c) | (b & c & ~a & ~d)):
        return False
    return len(_iso_lines(crop.astype(np.float64))) == 1


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels 4-adjacent to ``mask`` but outside it."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _stands_out(image: np.ndarray, owner: np.ndarray, drawn: np.ndarray, rgb: np.ndarray) -> bool:
    """The shape's outline touches no shape of a similar colour (they would look like one blob)
    and is mostly against background pixels of a clearly different colour.

    Args:
        owner: (S, S) index of the shape painted on each pixel, -1 for background.
    """
    ring = _ring(drawn)
    if not ring.any():  # the shape fills the image
        return True
    lookalike = np.linalg.norm(image[ring].astype(np.float32) - rgb, axis=1) < CONTRAST_DISTANCE
    if np.any(lookalike & (owner[ring] >= 0)):
        return False
    return float(np.mean(lookalike)) <= MAX_LOOKALIKE_BORDER


def compose_scene(rng: np.random.Generator, background: np.ndarray, requests: Sequence[Tuple[int, str, float]],
                  names: Sequence[str], colors: dict, min_visible: float = 0.5,
                  max_tries: int = 40) -> Tuple[np.ndarray, List[Instance]]:
    """Draws the requested shapes one over another, each at a random place and rotation.

    A placement is kept only when the new shape stands out from what is around it (no touching
    shape of a similar colour, mostly contrasting background), and
    after it every instance keeps ``>= min_visible`` of its drawn area, visible as one simple region
    (:func:`is_simple_region`). A shape that finds no such placement in ``max_tries`` is left out.

    Args:
        background: (S, S, 3) uint8.
        requests: (category index, colour name, radius in pixels) per shape, bottom to top.
        names: category names (index -> name).
        colors: colour name -> RGB.

    Returns:
        the (S, S, 3) uint8 image and the placed instances, bottom to top.
    """
    size = background.shape[0]
    image = background.copy()
    owner = np.full((size, size), -1, dtype=np.int32)
    instances: List[Instance] = []
    for category, color, radius in requests:
        rgb = np.clip(np.asarray(colors[color], dtype=np.float32) + rng.uniform(-12, 12, size=3), 0, 255)
        low, high = radius + 1.0, size - radius - 1.0
        if low > high:
            raise ValueError(f"a shape of radius {radius:.1f} does not fit in a {size}x{size} image")
        for _ in range(max_tries):
            outline = shape_outline(names[category], radius, rng.uniform(0, 2 * math.pi))
            drawn = rasterize(outline, (rng.uniform(low, high), rng.uniform(low, high)), size)
            if drawn.sum() < MIN_SHAPE_PIXELS or not _stands_out(image, owner, drawn, rgb) or \
                    not is_simple_region(drawn):
                continue
            updated = {}
            for index, other in enumerate(instances):
                if not (other.mask & drawn).any():
                    continue
                visible = other.mask & ~drawn
                if visible.sum() < min_visible * other.full_mask.sum() or not is_simple_region(visible):
                    break
                updated[index] = visible
            else:
                for index, visible in updated.items():
                    instances[index].mask = visible
                image[drawn] = rgb.astype(np.uint8)
                owner[drawn] = len(instances)
                instances.append(Instance(category, color, float(radius), drawn, drawn.copy()))
                break
    noisy = image.astype(np.float32) + 3.0 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8), instances


def mask_to_bbox(mask: np.ndarray) -> List[float]:
    """COCO box ``[x, y, w, h]`` of the mask's pixels (pixel edges, so a 1-pixel mask has w = 1)."""
    rows, cols = np.nonzero(mask)
    x0, y0 = int(cols.min()), int(rows.min())
    return [float(x0), float(y0), float(cols.max() + 1 - x0), float(rows.max() + 1 - y0)]


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Removes vertices lying on the straight segment between their neighbours (closed polygon)."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - before[:, 1]) - \
        (points[:, 1] - before[:, 1]) * (after[:, 0] - before[:, 0])
    return points[np.abs(cross) > 1e-9]


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` of a binary mask, one per outline.

    The outline is the mask's 0.5 iso-line (contourpy): it follows pixel edges and cuts each
    corner pixel diagonally, so every point lies within the mask's box (:func:`mask_to_bbox`) and
    rasterising the polygon gives back nearly the same pixels. Outlines of holes are returned as
    polygons too, as COCO has no holes in polygons; a region that passes :func:`is_simple_region`
    has exactly one. Coordinates are multiples of 0.5.
    """
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return []
    r0, c0 = int(rows.min()), int(cols.min())
    crop = np.pad(mask[r0:rows.max() + 1, c0:cols.max() + 1].astype(np.float64), 1)
    polygons = []
    for line in _iso_lines(crop):
        points = np.asarray(line, dtype=np.float64)
        if len(points) > 1 and np.array_equal(points[0], points[-1]):
            points = points[:-1]
        points = _drop_collinear(points)
        if len(points) >= 3:
            # crop index -> image index (-1 for the padding) -> COCO (+0.5: index i is a pixel centre)
            points = points + np.array([c0 - 1 + 0.5, r0 - 1 + 0.5])
            polygons.append([float(v) for v in points.reshape(-1)])
    return polygons


@dataclass
class Sample:
    """One generated image: (S, S, 3) uint8 ``image``, its ``instances`` (bottom to top) and the
    ``background`` kind (index into the spec's ``backgrounds``)."""

    image: np.ndarray
    instances: List[Instance] = field(default_factory=list)
    background: int = 0


def _palette(spec: dict) -> Tuple[List[str], dict]:
    return [c["name"] for c in spec["categories"]], {c["name"]: c["rgb"] for c in spec["colors"]}


def _compose_until_placed(rng: np.random.Generator, size: int, spec: dict, requests, what: str) -> Sample:
    """Composes on fresh backgrounds (of the spec's ``background_style``; version 1 specs had none: vivid)
    until the first (main) request is placed."""
    names, colors = _palette(spec)
    style = spec.get("background_style", "vivid")
    for _ in range(10):
        background, kind = render_background(rng, size, list(colors.values()), style)
        image, instances = compose_scene(rng, background, requests, names, colors)
        if instances and (instances[0].category, instances[0].color) == tuple(requests[0][:2]):
            return Sample(image, instances, kind)
    raise RuntimeError(f"could not place the main shape of {what} on 10 backgrounds; use another seed")


def render_scene(seed: int, split_id: int, index: int, size: int, spec: dict) -> Sample:
    """Scene image ``index`` of a split: 1-6 shapes of random category, colour, size (diameter from
    12 pixels to 60 % of the image, log-uniform), place and rotation.

    The first shape's category and colour cycle over every (category, colour) pair with ``index``,
    so each category appears in each colour once every ``categories x colours`` images.
    """
    rng = np.random.default_rng([seed, 0, split_id, index])
    num_categories, num_colors = len(spec["categories"]), len(spec["colors"])
    pair = index % (num_categories * num_colors)
    requests = [(pair % num_categories, spec["colors"][pair // num_categories]["name"])]
    requests += [(int(rng.integers(num_categories)), spec["colors"][int(rng.integers(num_colors))]["name"])
                 for _ in range(int(rng.integers(0, 6)))]
    low, high = math.log(max(6.0, 0.045 * size)), math.log(0.3 * size)
    requests = [(k, c, float(math.exp(rng.uniform(low, high)))) for k, c in requests]
    return _compose_until_placed(rng, size, spec, requests, f"scene {index} of split {split_id}")


def render_classification_image(seed: int, split_id: int, index: int, label: int, size: int, spec: dict) -> Sample:
    """Classification image ``index`` of a split: one large shape of category ``label`` (diameter
    56-84 % of the image) and 0-2 small distractors of other categories (the first instance is the
    labelled one)."""
    rng = np.random.default_rng([seed, 1, split_id, index])
    num_categories, colors = len(spec["categories"]), [c["name"] for c in spec["colors"]]
    others = [k for k in range(num_categories) if k != label]
    requests = [(label, colors[int(rng.integers(len(colors)))], float(rng.uniform(0.28, 0.42) * size))]
    for _ in range(int(rng.integers(0, 3))):
        requests.append((others[int(rng.integers(len(others)))], colors[int(rng.integers(len(colors)))],
                         float(max(6.0, rng.uniform(0.05, 0.09) * size))))
    return _compose_until_placed(rng, size, spec, requests, f"classification image {index} of split {split_id}")
