"""Weight types and "index:value" layer weights as ComfyUI_IPAdapter_plus defines them.

That pack (the most used IP-Adapter pack for ComfyUI) keys its per-layer weights by ComfyUI's
transformer index, which counts the cross-attention transformers in execution order:

* SD1.5, 16 indices: 0-5 = input 1, 2, 4, 5, 7, 8; 6 = middle; 7-15 = output 3-11;
* SDXL, 11 indices: 0-3 = input 4, 5, 7, 8; 4 = middle; 5-10 = output 0-5. All depth sub-blocks
  of one SDXL transformer share its index (index 3 is 10 of this pack's 70 SDXL layers).

A weight type gives each index an absolute weight, most of them a function of the Apply weight
w; every adapter layer here takes the value of its index. Nothing in this module departs from
that pack's arithmetic (same expressions, same operation order); the "precise" types also move
the reference to the unconditional side on some layers, returned as per-layer flags for
`IPApplication.swap_to_uncond`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from .layout import BlockKey

PLUS_WEIGHT_TYPES = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output", "weak middle",
    "strong middle", "style transfer", "composition", "strong style transfer", "style and composition",
    "style transfer precise", "composition precise",
)
WEAK = 0.2  # what the weak/strong types leave of w on the weakened blocks
EASE_FLOOR = 0.05  # the lowest fraction of w on the ease curves
WEAKENED = {"weak input": ("input",), "weak middle": ("middle",), "weak output": ("output",),
            "strong middle": ("input", "output")}
# Fixed weight of the composition layers in "style and composition": IPAdapter Advanced passes its
# weight_composition default, 1.0, whatever the weight (it is not scaled by w).
STYLE_AND_COMPOSITION_C = 1.0


class ResolvedWeights(NamedTuple):
    """What Apply hands the attention core: the weight, one multiplier per adapter layer (the
    layer's weight is their product), and per layer whether the reference moves to the negative."""

    weight: float
    per_layer: list[float] | None
    swap_to_uncond: tuple[bool, ...] | None


_BLOCK_RANK = {"input": 0, "middle": 1, "output": 2}


def plus_indices(layers: tuple[BlockKey, ...]) -> list[int]:
    """The ComfyUI transformer index of each adapter layer (depth sub-blocks share one).

    Refuses layer sets that are not a UNet's (Flux, SD3): that pack's indices name UNet transformers.
    """
    if not layers or any(key[0] not in _BLOCK_RANK for key in layers):
        raise ValueError("IPAdapter plus weight types and 'index:value' weights number UNet transformers "
                         "(SD1.5 0-15, SDXL 0-10); this adapter has no UNet layers (Flux/SD3): disconnect them")
    transformers = sorted({(_BLOCK_RANK[key[0]], key[1]) for key in layers})
    rank = {t: i for i, t in enumerate(transformers)}
    return [rank[(_BLOCK_RANK[key[0]], key[1])] for key in layers]


def base_name(count: int) -> str:
    return {16: "SD1.5", 11: "SDXL"}.get(count, f"this {count}-transformer UNet")


def index_map(layers: tuple[BlockKey, ...]) -> str:
    """'0-3 input 4, 5, 7, 8; 4 middle; 5-10 output 0-5' for error messages."""
    indices = plus_indices(layers)
    parts = []
    for name in ("input", "middle", "output"):
        found = sorted({(indices[i], key[1]) for i, key in enumerate(layers) if key[0] == name})
        if not found:
            continue
        first, last = found[0][0], found[-1][0]
        span = str(first) if first == last else f"{first}-{last}"
        blocks = "" if name == "middle" else " " + ", ".join(str(b) for _, b in found)
        parts.append(f"{span} {name}{blocks}")
    return "; ".join(parts)


def composition_indices(count: int) -> tuple[int, ...]:
    """The composition transformers: SDXL 3 (input 8); SD1.5 4 and 5 (input 7 and 8)."""
    return (3,) if count == 11 else (4, 5)


def type_weights(weight_type: str, blocks: list[str], w: float, style_boost: float = 1.0,
                 composition_boost: float = 0.0) -> list[float]:
    """The absolute weight of every transformer index for a weight type (0 = no image term).

    blocks: "input" / "middle" / "output" per index, in index order (16 for SD1.5, 11 for SDXL).
    """
    count = len(blocks)
    if count not in (11, 16):
        raise ValueError(f"IPAdapter plus weight types are defined for SD1.5 (16 transformers) and SDXL (11); "
                         f"this UNet has {count}")
    xl = count == 11
    half = count / 2
    if weight_type == "linear":
        return [w] * count
    if weight_type == "ease in":
        return [w * (EASE_FLOOR + (1 - EASE_FLOOR) * (1 - i / count)) for i in range(count)]
    if weight_type == "ease out":
        return [w * (EASE_FLOOR + (1 - EASE_FLOOR) * (i / count)) for i in range(count)]
    if weight_type == "ease in-out":
        return [w * (EASE_FLOOR + (1 - EASE_FLOOR) * (1 - abs(i - half) / half)) for i in range(count)]
    if weight_type == "reverse in-out":
        return [w * (EASE_FLOOR + (1 - EASE_FLOOR) * (abs(i - half) / half)) for i in range(count)]
    if weight_type in WEAKENED:
        return [w * WEAK if block in WEAKENED[weight_type] else w for block in blocks]
    # The remaining types name index sets; an index they leave out gets no image term.
    sd15_style = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)
    table: dict[int, float]
    if weight_type == "style transfer":
        table = {6: w} if xl else dict.fromkeys(sd15_style, w)
    elif weight_type == "composition":
        table = {3: w} if xl else {4: w * 0.25, 5: w}
    elif weight_type == "strong style transfer":
        table = {i: w for i in range(count) if i not in composition_indices(count)}
    elif weight_type in ("style and composition", "style transfer precise"):
        c = STYLE_AND_COMPOSITION_C if weight_type == "style and composition" else style_boost
        table = {3: c, 6: w} if xl else {**dict.fromkeys(sd15_style, w), 4: c * 0.25, 5: c}
    elif weight_type == "composition precise":
        b = composition_boost
        if xl:
            table = {i: b * 0.1 for i in range(count)} | {3: w, 6: b}
        else:
            table = {i: b * 0.1 for i in (6, 7, 8)} | dict.fromkeys((0, 1, 2, 3, *range(9, 16)), b)
            table |= {4: w * 0.25, 5: w}
    else:
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {', '.join(PLUS_WEIGHT_TYPES)}")
    return [table.get(i, 0.0) for i in range(count)]


def swapped_indices(weight_type: str, count: int) -> set[int]:
    """Where a "precise" type makes the reference the negative: style transfer precise on the
    composition transformers, composition precise on every other one."""
    composition = set(composition_indices(count))
    if weight_type == "style transfer precise":
        return composition
    if weight_type == "composition precise":
        return set(range(count)) - composition
    return set()


_PLUS_ENTRY = re.compile(r"^\s*[+-]?\d+\s*:")


def is_plus_table(text: str) -> bool:
    """True when any entry starts with a bare integer and a colon ('3:1.0'): IPAdapter plus's form."""
    return any(_PLUS_ENTRY.match(item) for item in re.split(r"[,\n]", text))


def parse_plus_table(text: str) -> tuple[tuple[int, float], ...]:
    """Read "index:value, index:value" (commas or new lines between entries) as (index, value) pairs.

    Errors name the entry and what it should look like; ranges are checked once the base is known.
    """
    pairs: dict[int, float] = {}
    for item in re.split(r"[,\n]", text):
        if not item.strip():
            continue  # that pack errors on an empty entry (a trailing comma); nothing is lost by allowing it
        index_text, colon, value_text = item.partition(":")
        if not colon or not re.fullmatch(r"\s*[+-]?\d+\s*", index_text):
            raise ValueError(f"cannot read layer weight {item.strip()!r}: in the 'index:value' form every entry is "
                             "a transformer index, a colon and a number, e.g. '3:1.0, 6:0.5'")
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"layer weight {item.strip()!r}: {value_text.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"layer weight {item.strip()!r}: the weight must be a finite number")
        index = int(index_text)
        if index in pairs:
            raise ValueError(f"layer weights give index {index} twice ({pairs[index]:g} and {value:g}); give it once")
        pairs[index] = value
    if not pairs:
        raise ValueError("the layer weights are empty; write e.g. '3:1.0, 6:0.5'")
    return tuple(pairs.items())


def plus_table_values(pairs: tuple[tuple[int, float], ...], count: int, layers: tuple[BlockKey, ...]) -> list[float]:
    """One value per transformer index; indices not listed get 0 (no image term), as in that pack."""
    for index, _ in pairs:
        if not 0 <= index < count:
            raise ValueError(f"layer weight index {index} is out of range for {base_name(count)}: its transformer "
                             f"indices are 0-{count - 1} ({index_map(layers)})")
    values = dict(pairs)
    return [values.get(i, 0.0) for i in range(count)]


def _blocks_by_index(layers: tuple[BlockKey, ...]) -> tuple[list[int], list[str]]:
    indices = plus_indices(layers)
    blocks = [""] * (max(indices) + 1)
    for i, key in zip(indices, layers, strict=True):
        blocks[i] = key[0]
    return indices, blocks


def plus_table_weights(pairs: tuple[tuple[int, float], ...], layers: tuple[BlockKey, ...]) -> list[float]:
    """Per adapter layer multipliers (of the Apply weight) from "index:value" pairs."""
    indices, blocks = _blocks_by_index(layers)
    values = plus_table_values(pairs, len(blocks), layers)
    return [values[i] for i in indices]


@dataclass(frozen=True)
class PlusWeightType:
    """An IPAdapter plus weight type (with its boosts and optional "index:value" weights),
    resolved against an adapter's layers and the Apply weight when the adapter is known.

    layer_weights: as IPAdapter Mad Scientist, the listed indices get value x w, the others 0; the
    weight type then only counts for its "precise" swap (that pack turns every other type linear).
    """

    weight_type: str = "linear"
    style_boost: float = 1.0
    composition_boost: float = 0.0
    layer_weights: tuple[tuple[int, float], ...] = ()

    @classmethod
    def parse(cls, weight_type: str, style_boost: float = 1.0, composition_boost: float = 0.0,
              layer_weights: str = "") -> PlusWeightType:
        if weight_type not in PLUS_WEIGHT_TYPES:
            raise ValueError(f"unknown weight type {weight_type!r}; expected one of {', '.join(PLUS_WEIGHT_TYPES)}")
        pairs = parse_plus_table(layer_weights) if layer_weights.strip() else ()
        return cls(weight_type, float(style_boost), float(composition_boost), pairs)

    def resolve(self, layers: tuple[BlockKey, ...], weight: float) -> ResolvedWeights:
        """Absolute per-layer weights (so the Apply weight passed on is 1.0) and the swap flags.

        The values are absolute because some are not proportional to w (the boosts, the fixed
        composition weight of "style and composition"): multipliers of w could not express them at w = 0.
        """
        indices, blocks = _blocks_by_index(layers)
        count = len(blocks)
        if self.layer_weights:
            values = [v * weight for v in plus_table_values(self.layer_weights, count, layers)]
        else:
            values = type_weights(self.weight_type, blocks, weight, self.style_boost, self.composition_boost)
        swapped = swapped_indices(self.weight_type, count)
        swaps = tuple(i in swapped for i in indices) if swapped else None
        return ResolvedWeights(1.0, [values[i] for i in indices], swaps)
