"""Captions and text passages describing `shapes` scenes: colours, shapes, counts, relations.

Every caption is derived from the scene's instances, so it is true of the image.
"""
from collections import Counter
from typing import List, Sequence

import numpy as np

__all__ = ["describe_scene", "NUMBER_WORDS", "plural", "size_word", "relation"]

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]


def plural(name: str, count: int) -> str:
    if count == 1:
        return name
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def size_word(radius: float, image_size: int) -> str:
    ratio = radius / image_size
    return "small" if ratio < 0.12 else ("large" if ratio > 0.22 else "medium")


def relation(a, b) -> str:
    """Where instance ``a`` is relative to ``b`` (by centres, dominant axis)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count_phrase(counts: Counter) -> str:
    parts = [f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {plural(name, n)}" for name, n in
             sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_scene(rng: np.random.Generator, instances: Sequence, names: Sequence[str], image_size: int,
                   background: str, num_captions: int) -> List[str]:
    """Returns ``num_captions`` different lower-case captions of a scene (fewer only if the scene
    allows fewer distinct sentences; at least 2 for a scene with one or more instances)."""
    def phrase(inst, with_size=False):
        words = ([size_word(inst.radius, image_size)] if with_size else []) + [inst.color, names[inst.category]]
        return _article(" ".join(words))

    ordered = sorted(instances, key=lambda inst: -inst.mask.sum())
    shape_counts = Counter(names[inst.category] for inst in instances)
    color_counts = Counter(f"{inst.color} {names[inst.category]}" for inst in instances)
    total = len(instances)
    candidates = []
    if total == 1:
        candidates += [f"{phrase(ordered[0])} on a {background} background", f"a picture of {phrase(ordered[0], True)}",
                       f"there is one {names[ordered[0].category]} and it is {ordered[0].color}",
                       f"a single {ordered[0].color} shape: {_article(names[ordered[0].category])}"]
    else:
        a, b = ordered[0], ordered[1]
        candidates += [f"{phrase(a)} {relation(a, b)} {phrase(b)}",
                       f"{phrase(a, True)} and {phrase(b, True)} on a {background} background",
                       f"{NUMBER_WORDS[total] if total < len(NUMBER_WORDS) else total} shapes: {_count_phrase(shape_counts)}",
                       f"{_count_phrase(color_counts)}",
                       f"{phrase(b)} {relation(b, a)} {phrase(a)}"]
        if total >= 3:
            c = ordered[2]
            candidates.append(f"{phrase(c)} {relation(c, a)} {phrase(a)}, with {phrase(b)} nearby")
    rng.shuffle(candidates)
    unique = list(dict.fromkeys(candidates))
    return unique[:max(2, num_captions)]
