"""Captions and text passages about `shapes` scenes.

Captions are computed from what is visible in the image (the instances' visible masks), so they are
true of it: colours and shapes are the drawn ones, counts are exact, spatial relations compare the
centroids of the visible pixels and are stated only when the offset is clear, and a relation or
an occlusion names two objects only when each is the only one of its colour and shape.
"""
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Thing", "describe_scene", "corpus_line", "NUMBER_WORDS"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CLEAR_OFFSET = 0.15  # min centroid offset (fraction of the image side) for "left of", "above", ...
SIZE_RATIO = 3.0  # min ratio of drawn areas to call one shape large and the other small


@dataclass(frozen=True)
class Thing:
    """What a caption may say about one instance.

    Attributes:
        shape, plural: category name and its plural.
        color: colour name.
        x, y: centroid of the visible pixels (pixels).
        drawn_area: pixel count of the whole shape as drawn (before occlusion).
        covered_by: indices (into the scene's things) of the shapes that hide part of it.
    """

    shape: str
    plural: str
    color: str
    x: float
    y: float
    drawn_area: int
    covered_by: Tuple[int, ...] = ()


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _number(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _counted(count: int, singular: str, plural: str, one: str = "a") -> str:
    """"a red circle" / "one red circle" / "three red circles"."""
    if count == 1:
        return _article(singular) if one == "a" else f"one {singular}"
    return f"{_number(count)} {plural}"


def relation(a: Thing, b: Thing, size: int) -> Optional[str]:
    """Where ``a`` is relative to ``b`` ("to the left of", "above and to the right of", ...), or
    None when the centroids are too close to tell."""
    dx, dy = a.x - b.x, a.y - b.y
    clear = CLEAR_OFFSET * size
    horizontal = ("to the left of" if dx < 0 else "to the right of") if abs(dx) >= clear else None
    vertical = ("above" if dy < 0 else "below") if abs(dy) >= clear else None
    if horizontal and vertical:
        if abs(dx) >= 2 * abs(dy):
            return horizontal
        if abs(dy) >= 2 * abs(dx):
            return vertical
        return f"{vertical} and {horizontal}"
    return horizontal or vertical


def position(thing: Thing, size: int) -> Optional[str]:
    """"in the top left corner", "in the middle", ... by thirds of the image, or None near a border
    between thirds."""
    words = []
    for value, (low, mid, high) in ((thing.y, ("top", "", "bottom")), (thing.x, ("left", "", "right"))):
        third = value / size * 3
        if min(abs(third - 1), abs(third - 2)) < 0.15:
            return None
        words.append((low, mid, high)[min(int(third), 2)])
    vertical, horizontal = words
    if vertical and horizontal:
        return f"in the {vertical} {horizontal} corner"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal} side"
    return "in the middle"


def _size_word(thing: Thing, size: int) -> str:
    diameter = 2 * np.sqrt(thing.drawn_area / np.pi) / size
    return "small" if diameter < 0.22 else ("large" if diameter > 0.42 else "medium-sized")


def _single(t: Thing, background: str, size: int) -> List[str]:
    name = f"{t.color} {t.shape}"
    out = [f"{_article(name)} on {_article(background)} background",
           f"{_article(_size_word(t, size) + ' ' + name)}",
           f"a single {t.shape}, colored {t.color}",
           f"the only shape in the picture is {_article(name)}",
           f"a picture of one {name} on {_article(background)} background"]
    where = position(t, size)
    if where:
        out.append(f"{_article(name)} {where}")
    return out


def _multiple(things: Sequence[Thing], background: str, size: int) -> List[str]:
    pairs = Counter((t.color, t.shape) for t in things)
    plural = {t.shape: t.plural for t in things}
    groups = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    listed = _join([_counted(n, f"{c} {s}", f"{c} {plural[s]}") for (c, s), n in groups])
    by_shape = sorted(Counter(t.shape for t in things).items(), key=lambda kv: (-kv[1], kv[0]))
    by_color = sorted(Counter(t.color for t in things).items(), key=lambda kv: (-kv[1], kv[0]))
    total = _number(len(things))
    out = [f"{listed} on {_article(background)} background",
           f"{total} shapes: {listed}",
           f"{total} shapes, namely {_join([_counted(n, s, plural[s], one='one') for s, n in by_shape])}",
           f"{_join([_counted(n, c + ' shape', c + ' shapes', one='one') for c, n in by_color])}, "
           f"among them {_join([_counted(n, s, plural[s]) for s, n in by_shape])}"]
    unique = [i for i, t in enumerate(things) if pairs[(t.color, t.shape)] == 1]
    # the two largest identifiable shapes; then every identifiable pair with a clear relation
    by_size = sorted(unique, key=lambda i: -things[i].drawn_area)
    related = [(i, j) for i in by_size for j in by_size if i != j and relation(things[i], things[j], size)]
    for k, (i, j) in enumerate(related[:2]):
        a, b = things[i], things[j]
        rel = relation(a, b, size)
        if k == 0:
            out.append(f"{_article(a.color + ' ' + a.shape)} {rel} {_article(b.color + ' ' + b.shape)}")
        else:
            out.append(f"the {a.color} {a.shape} is {rel} the {b.color} {b.shape}")
        if a.drawn_area >= SIZE_RATIO * b.drawn_area:
            out.append(f"a large {a.color} {a.shape} {rel} a small {b.color} {b.shape}")
        elif b.drawn_area >= SIZE_RATIO * a.drawn_area:
            out.append(f"a small {a.color} {a.shape} {rel} a large {b.color} {b.shape}")
    for i in unique:
        hiders = [j for j in things[i].covered_by if j in unique]
        if hiders:
            a, b = things[i], things[hiders[0]]
            out.append(f"{_article(b.color + ' ' + b.shape)} partly covering {_article(a.color + ' ' + a.shape)}")
            break
    largest = max(range(len(things)), key=lambda i: things[i].drawn_area)
    second = max(t.drawn_area for i, t in enumerate(things) if i != largest)
    if largest in unique and things[largest].drawn_area >= 1.5 * second:
        t = things[largest]
        out.append(f"the largest of the {total} shapes is {_article(t.color + ' ' + t.shape)}")
    return out


def describe_scene(rng: np.random.Generator, things: Sequence[Thing], background: str, size: int,
                   num_captions: int) -> List[str]:
    """Up to ``num_captions`` different lower-case captions of a scene, in random order.

    Args:
        things: the visible instances.
        background: the background's word ("striped", ...).
        size: image side in pixels.

    Returns:
        captions; at least 2 whenever ``things`` is not empty and ``num_captions >= 2``.
    """
    if not things:
        return [f"an empty {background} background", f"{_article(background)} background with no shapes"]
    candidates = _single(things[0], background, size) if len(things) == 1 else _multiple(things, background, size)
    candidates = list(dict.fromkeys(candidates))
    order = rng.permutation(len(candidates))
    return [candidates[i] for i in order[:num_captions]]


def corpus_line(rng: np.random.Generator, captions: Sequence[Sequence[str]], spec: dict) -> str:
    """One passage (1-3 sentences) for the masked-language-modelling corpus: scene descriptions
    from ``captions`` (one list of captions per image), facts from the spec, colour mixing, and
    sentences about made-up scenes."""
    categories, colors = spec["categories"], [c["name"] for c in spec["colors"]]
    sentences = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(6))
        category = categories[int(rng.integers(len(categories)))]
        color, other = (colors[i] for i in rng.choice(len(colors), size=2, replace=False))
        count = int(rng.integers(2, 6))
        if kind == 0 and captions:
            texts = captions[int(rng.integers(len(captions)))]
            sentences.append(texts[int(rng.integers(len(texts)))] + ".")
        elif kind == 1:
            sentences.append(category["facts"][int(rng.integers(len(category["facts"])))])
        elif kind == 2:
            first, second, mixed = spec["color_mixing"][int(rng.integers(len(spec["color_mixing"])))]
            sentences.append(str(rng.choice([f"{first} and {second} make {mixed}.",
                                              f"if you mix {first} with {second}, you get {mixed}.",
                                              f"{mixed} is a mix of {first} and {second}."])))
        elif kind == 3:
            sentences.append(spec["general_facts"][int(rng.integers(len(spec["general_facts"])))])
        elif kind == 4:
            name, plural = category["name"], category["plural"]
            sentences.append(str(rng.choice([
                f"is the {name} {color}? no, the {name} is {other}.",
                f"she drew {_number(count)} {color} {plural} and {_article(other + ' ' + name)}.",
                f"there are {_number(count)} {plural} in the picture, and all of them are {color}.",
                f"{_article(color + ' ' + name)} is still {_article(name)} when you paint it {other}.",
                f"he looked for {_article(color + ' ' + name)} but found only {other} {plural}.",
            ])))
        else:
            name = category["name"]
            sentences.append(str(rng.choice([
                f"which shape is {color}? the {name} is.",
                f"the {name} was moved to the left of the {color} square.",
                f"under the {color} {name} lies {_article(other)} one.",
            ])))
    return " ".join(sentences)
