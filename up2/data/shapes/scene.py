"""Drawing of `shapes` images: textured backgrounds, rotated coloured shapes, visible masks and
their COCO polygons. Everything is driven by a ``numpy.random.Generator`` so output is reproducible."""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import contourpy
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["Instance", "shape_vertices", "render_background", "compose_scene", "mask_to_polygons",
           "BACKGROUND_WORDS"]

# How captions name each background texture of render_background, in the order of its kinds.
BACKGROUND_WORDS = ("smooth", "mottled", "striped", "checkered")


@dataclass
class Instance:
    """One drawn shape: category index (0-based), colour name, centre (x, y), radius, visible mask."""

    category: int
    color: str
    center: Tuple[float, float]
    radius: float
    mask: np.ndarray  # (H, W) bool, the visible pixels


def _regular_polygon(sides: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def shape_vertices(name: str, radius: float, rotation: float) -> np.ndarray:
    """Vertices (K, 2) of a shape centred at the origin, fitting in a circle of ``radius``."""
    if name == "circle":
        points = _regular_polygon(48, radius, 0.0)
    elif name == "square":
        points = _regular_polygon(4, radius, math.pi / 4)
    elif name == "diamond":
        points = _regular_polygon(4, radius, 0.0) * np.array([0.7, 1.0])
    elif name == "triangle":
        points = _regular_polygon(3, radius, -math.pi / 2)
    elif name == "pentagon":
        points = _regular_polygon(5, radius, -math.pi / 2)
    elif name == "hexagon":
        points = _regular_polygon(6, radius, 0.0)
    elif name == "star":
        outer = _regular_polygon(5, radius, -math.pi / 2)
        inner = _regular_polygon(5, radius * 0.45, -math.pi / 2 + math.pi / 5)
        points = np.stack([outer, inner], axis=1).reshape(-1, 2)
    elif name == "cross":
        a, b = radius * 0.75, radius * 0.27
        points = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                           [-a, b], [-a, -b], [-b, -b]])
    elif name == "heart":
        t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        points = np.stack([x, y], axis=1) * (radius / 17.0)
    elif name == "arrow":
        a, h, w = radius, radius * 0.2, radius * 0.55
        points = np.array([[-a, -h], [0.1 * a, -h], [0.1 * a, -w], [a, 0.0], [0.1 * a, w], [0.1 * a, h], [-a, h]])
    else:
        raise ValueError(f"unknown shape {name!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    return points @ np.array([[c, s], [-s, c]])


def render_background(rng: np.random.Generator, size: int, palette: Sequence[Sequence[int]]) -> Tuple[np.ndarray, str]:
    """Returns a (size, size, 3) uint8 texture (gradient, smooth noise, stripes or checkerboard in
    random colours) and its word in BACKGROUND_WORDS."""
    kind = int(rng.integers(4))
    first = np.asarray(palette[rng.integers(len(palette))], dtype=np.float32) * rng.uniform(0.35, 0.9)
    second = rng.uniform(0, 255, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = np.clip((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5, 0, 1)[..., None]
        image = first * (1 - t) + second * t
    elif kind == 1:  # smooth noise
        coarse = rng.uniform(0, 1, size=(8, 8)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))[..., None]
        image = first * (1 - t) + second * t
    elif kind == 2:  # stripes
        period, angle = rng.uniform(0.08, 0.25), rng.uniform(0, math.pi)
        t = ((xx * math.cos(angle) + yy * math.sin(angle)) / period % 1.0 < 0.5)[..., None]
        image = np.where(t, first, second * 0.8)
    else:  # checkerboard
        cells = rng.integers(3, 9)
        t = (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 0)[..., None]
        image = np.where(t, first, second * 0.8)
    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), BACKGROUND_WORDS[kind]


def _rasterise(vertices: np.ndarray, center: Tuple[float, float], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    points = [(float(x + center[0]), float(y + center[1])) for x, y in vertices]
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _is_simple_region(mask: np.ndarray) -> bool:
    """One 8-connected piece without holes."""
    _, num_pieces = ndimage.label(mask, structure=np.ones((3, 3)))
    return num_pieces == 1 and bool(np.array_equal(ndimage.binary_fill_holes(mask), mask))


def compose_scene(rng: np.random.Generator, size: int, shapes: Sequence[Tuple[int, str, str, float]],
                  colors: dict, background: np.ndarray, min_visible: float = 0.5,
                  max_tries: int = 30) -> Tuple[np.ndarray, List[Instance]]:
    """Draws shapes one over another at random places; a placement is kept only if every instance
    keeps >= ``min_visible`` of its area and one hole-free visible piece.

    Args:
        shapes: (category index, shape name, colour name, radius) per requested shape.
        colors: colour name -> RGB.
        background: (size, size, 3) uint8.

    Returns:
        the (size, size, 3) uint8 image and the placed instances (some may be dropped).
    """
    image = background.copy()
    owner = np.full((size, size), -1, dtype=np.int32)
    areas: List[int] = []
    instances: List[Instance] = []
    for category, name, color, radius in shapes:
        rotation = rng.uniform(0, 2 * math.pi)
        vertices = shape_vertices(name, radius, rotation)
        for _ in range(max_tries):
            center = (rng.uniform(radius * 0.6, size - radius * 0.6), rng.uniform(radius * 0.6, size - radius * 0.6))
            drawn = _rasterise(vertices, center, size)
            if drawn.sum() < 40:
                continue
            new_owner = np.where(drawn, len(instances), owner)
            masks = [new_owner == i for i in range(len(instances) + 1)]
            full_areas = areas + [int(drawn.sum())]
            if all(m.sum() >= min_visible * a and _is_simple_region(m) for m, a in zip(masks, full_areas)):
                owner, areas = new_owner, full_areas
                image[drawn] = np.clip(np.asarray(colors[color]) + rng.normal(0, 8, size=3), 0, 255).astype(np.uint8)
                instances.append(Instance(category, color, center, radius, drawn))
                break
    for index, instance in enumerate(instances):
        instance.mask = owner == index
    return image, instances


def mask_to_polygons(mask: np.ndarray) -> Optional[List[List[float]]]:
    """COCO polygons ``[[x1, y1, x2, y2, ...]]`` (pixel-edge coordinates) of a binary mask's outline.

    The contour at level 0.5 runs half-way between pixel centres; pixel (col, row) covers
    [col, col + 1) x [row, row + 1) in COCO coordinates, hence the +0.5 shift.
    """
    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    polygons = []
    for line in lines:
        points = np.asarray(line)[:, :2] - 1 + 0.5  # undo padding, centre -> edge coordinates
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            polygons.append([round(float(v), 2) for v in points.reshape(-1)])
    return polygons or None
