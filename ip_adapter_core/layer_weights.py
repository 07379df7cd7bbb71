"""Per-layer weights: presets, a free text table, and diffusers/InstantStyle block dictionaries.

Every form resolves to one multiplier per adapter layer, in the adapter's own layer order
(diffusers' processor order, `layout.SD15_LAYERS` / `SDXL_LAYERS`), which the attention patch
multiplies into the weight.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .layout import BlockKey
from .plus_weights import ResolvedWeights, is_plus_table, parse_plus_table, plus_table_weights

WEAK = 0.2  # what "weak" leaves of the weight
EASE_FLOOR = 0.05  # the lowest multiplier of the ease curves


def diffusers_location(key: BlockKey) -> tuple[str, int, int]:
    """("down" | "mid" | "up", block, attention) of a ComfyUI block key (two res blocks per level)."""
    name, block_id, _ = key
    if name == "input":
        return "down", (block_id - 1) // 3, (block_id - 1) % 3
    if name == "output":
        return "up", block_id // 3, block_id % 3
    return "mid", 0, 0


def depth_order(layers: tuple[BlockKey, ...]) -> list[int]:
    """Layer indices in the order the signal meets them: input blocks, middle, output blocks."""
    rank = {"input": 0, "middle": 1, "output": 2}
    return sorted(range(len(layers)), key=lambda i: (rank[layers[i][0]], layers[i][1], layers[i][2]))


def _deepest(layers: tuple[BlockKey, ...], part: str) -> list[int]:
    """Attention positions of the lowest-resolution level of the down ("down") or up ("up") path."""
    located = [diffusers_location(k) for k in layers]
    blocks = [b for (p, b, _) in located if p == part]
    level = max(blocks) if part == "down" else min(blocks)
    return [i for i, (p, b, _) in enumerate(located) if p == part and b == level]


def style_layers(layers: tuple[BlockKey, ...]) -> list[int]:
    """The middle attention of the deepest up level: SDXL output 1 (InstantStyle), SD1.5 output 4."""
    deepest = _deepest(layers, "up")
    return [i for i in deepest if diffusers_location(layers[i])[2] == 1]


def composition_layers(layers: tuple[BlockKey, ...]) -> list[int]:
    """The last attention of the deepest down level: SDXL and SD1.5 input 8 (InstantStyle layout)."""
    deepest = _deepest(layers, "down")
    last = max(diffusers_location(layers[i])[2] for i in deepest)
    return [i for i in deepest if diffusers_location(layers[i])[2] == last]


# Ease curves over p = 0 at the first input layer .. 1 at the last output layer.
EASE_CURVES = {
    "ease in": lambda p: p,
    "ease out": lambda p: 1 - p,
    "ease in-out": lambda p: 1 - abs(2 * p - 1),
    "reverse in-out": lambda p: abs(2 * p - 1),
}
# Weak presets: the blocks that keep only WEAK of the weight.
WEAK_BLOCKS = {"weak input": ("input",), "weak middle": ("middle",), "weak output": ("output",),
               "strong middle": ("input", "output")}
# Layer-set presets: (style layers, composition layers); every other layer gets 0.
LAYER_SETS = {
    "style transfer": ("style", None),
    "composition": (None, "composition"),
    "strong style transfer": ("strong style", None),
    "style and composition": ("style", "composition"),
    "strong style and composition": ("strong style", "composition"),
}
PRESETS = ("linear", *EASE_CURVES, *WEAK_BLOCKS, *LAYER_SETS)


def _layer_set(name: str | None, layers: tuple[BlockKey, ...]) -> set[int]:
    if name is None:
        return set()
    if name == "strong style":
        return set(_deepest(layers, "up"))
    return set(style_layers(layers) if name == "style" else composition_layers(layers))


def preset_weights(preset: str, layers: tuple[BlockKey, ...],
                   style: float = 1.0, composition: float = 1.0) -> list[float]:
    """One multiplier per layer for a named preset; `style`/`composition` scale those layer sets."""
    n = len(layers)
    if preset == "linear":
        return [1.0] * n
    if preset in EASE_CURVES:
        position = {layer: rank / max(n - 1, 1) for rank, layer in enumerate(depth_order(layers))}
        return [EASE_FLOOR + (1 - EASE_FLOOR) * EASE_CURVES[preset](position[i]) for i in range(n)]
    if preset in WEAK_BLOCKS:
        return [WEAK if key[0] in WEAK_BLOCKS[preset] else 1.0 for key in layers]
    if preset in LAYER_SETS:
        style_name, composition_name = LAYER_SETS[preset]
        style_set, comp_set = _layer_set(style_name, layers), _layer_set(composition_name, layers)
        return [style if i in style_set else composition if i in comp_set else 0.0 for i in range(n)]
    raise ValueError(f"unknown layer weights preset {preset!r}; expected one of {', '.join(PRESETS)}")


@dataclass(frozen=True)
class TableEntry:
    selector: str  # "default", "input 4", "output 1.3", "middle", "#12"
    value: float


_ENTRY = re.compile(r"^\s*(default|all|middle(?:\.\d+)?|(?:input|output)\s+\d+(?:\.\d+)?|#\d+)\s*[=:]\s*(\S+)\s*$")


def parse_table(text: str) -> list[TableEntry] | list[float]:
    """Parse a free per-layer table: `key = value` entries, or a plain list of numbers.

    Keys: `default` (every layer not named), `input N`, `output N`, `middle` (all transformers
    of that block), `input N.T` (transformer T only), `#I` (adapter layer I). Entries are
    separated by commas or new lines. A plain list gives one value per adapter layer.
    """
    items = [s for s in re.split(r"[,\n;]", text) if s.strip()]
    if not items:
        raise ValueError("the layer weights table is empty")
    try:
        return [float(s) for s in items]
    except ValueError:
        pass
    entries = []
    for item in items:
        m = _ENTRY.match(item.lower())
        if not m:
            raise ValueError(
                f"cannot read layer weight {item.strip()!r}: write `block = value` with block one of default, "
                "input N, output N, middle, input N.T, #I (e.g. 'default=0, output 1=1')"
            )
        try:
            value = float(m[2])
        except ValueError:
            raise ValueError(f"layer weight {item.strip()!r}: {m[2]!r} is not a number") from None
        entries.append(TableEntry(re.sub(r"\s+", " ", m[1].replace("all", "default")), value))
    return entries


def _selected(selector: str, key: BlockKey, index: int) -> bool:
    if selector.startswith("#"):
        return int(selector[1:]) == index
    if selector.startswith("middle"):
        transformer = selector.partition(".")[2]
        return key[0] == "middle" and (not transformer or int(transformer) == key[2])
    name, _, rest = selector.partition(" ")
    block, _, transformer = rest.partition(".")
    return key[0] == name and int(block) == key[1] and (not transformer or int(transformer) == key[2])


def table_weights(table: list[TableEntry] | list[float], layers: tuple[BlockKey, ...],
                  base: list[float] | None = None) -> list[float]:
    """Resolve a parsed table against an adapter's layers; names no layer has are an error.

    Layers the table does not name take its `default`, else their value in `base` (else 1).
    """
    n = len(layers)
    if table and isinstance(table[0], float):
        if len(table) != n:
            raise ValueError(f"{len(table)} layer weights given; this adapter has {n} layers (give {n} numbers)")
        return list(table)
    out = [None] * n
    default = None
    for entry in table:
        if entry.selector == "default":
            default = entry.value
            continue
        hits = [i for i, key in enumerate(layers) if _selected(entry.selector, key, i)]
        if not hits:
            raise ValueError(f"layer weights name {entry.selector!r}, which this adapter does not have; its blocks are "
                             + ", ".join(sorted({f"{k[0]} {k[1]}" for k in layers})))
        for i in hits:
            out[i] = entry.value
    fallback = [1.0] * n if base is None else base
    return [(fallback[i] if default is None else default) if v is None else v for i, v in enumerate(out)]


def parse_block_dict(text: str) -> dict:
    """Read a diffusers/InstantStyle scale dictionary, e.g. {"up": {"block_0": [0, 1, 0]}}."""
    try:
        scales = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the block dictionary is not valid JSON ({e.msg}); write e.g. "
                         '{"down": {"block_2": [0, 1]}, "up": {"block_0": [0, 1, 0]}}') from None
    if not isinstance(scales, dict) or set(scales) - {"down", "mid", "up"}:
        raise ValueError('a block dictionary has only the keys "down", "mid" and "up"')
    return scales


def dict_weights(scales: dict, layers: tuple[BlockKey, ...]) -> list[float]:
    """diffusers' `set_ip_adapter_scale(dict)`: unnamed blocks get 0, a list gives one value per attention."""
    located = [diffusers_location(k) for k in layers]
    attentions = {part: {} for part in ("down", "up")}
    for part, block, attention in located:
        if part != "mid":
            attentions[part].setdefault(block, set()).add(attention)
    out = []
    for part, block, attention in located:
        value = scales.get(part, 0.0)
        if part == "mid":
            value = value[0] if isinstance(value, list) and len(value) == 1 else value
        elif isinstance(value, dict):
            unknown = set(value) - {f"block_{b}" for b in attentions[part]}
            if unknown:
                raise ValueError(f"{part} has no attention block {sorted(unknown)[0]}; it has "
                                 + ", ".join(f"block_{b}" for b in sorted(attentions[part])))
            value = value.get(f"block_{block}", 0.0)
        if isinstance(value, list):
            count = len(attentions[part][block]) if part != "mid" else 1
            if len(value) == 1:
                value = value * count
            if len(value) != count:
                raise ValueError(f"{part} block_{block} has {count} attentions; {len(value)} scales were given")
            value = value[attention]
        if not isinstance(value, (int, float)):
            raise ValueError(f"scale for {part} block_{block} must be a number or a list of numbers, not {value!r}")
        out.append(float(value))
    return out


@dataclass(frozen=True)
class LayerWeights:
    """A per-layer weighting chosen in the graph, resolved once the adapter's layers are known.

    `table` refines the preset; `block_dict` (diffusers semantics) stands alone, and so does
    `plus_table`, IPAdapter plus's "index:value" weights (unlisted transformer indices get 0).
    """

    preset: str = "linear"
    table: tuple = ()
    block_dict: dict | None = None
    style: float = 1.0
    composition: float = 1.0
    plus_table: tuple[tuple[int, float], ...] = ()

    @classmethod
    def parse(cls, preset: str, table_text: str = "", dict_text: str = "",
              style: float = 1.0, composition: float = 1.0) -> LayerWeights:
        """Check everything that can be checked before the adapter is known."""
        if preset not in PRESETS:
            raise ValueError(f"unknown layer weights preset {preset!r}; expected one of {', '.join(PRESETS)}")
        if table_text.strip() and dict_text.strip():
            raise ValueError("give either a layer table or a diffusers block dictionary, not both")
        if is_plus_table(table_text):
            # That pack's form sets every layer (unlisted ones to 0): a preset under it would be silently lost.
            if preset != "linear":
                raise ValueError(f"the 'index:value' layer weights set every layer (indices not listed get 0), so "
                                 f"they replace the preset: set preset to linear (it is {preset!r})")
            return cls(preset, (), None, style, composition, parse_plus_table(table_text))
        table = tuple(parse_table(table_text)) if table_text.strip() else ()
        block_dict = parse_block_dict(dict_text) if dict_text.strip() else None
        return cls(preset, table, block_dict, style, composition)

    def for_layers(self, layers: tuple[BlockKey, ...]) -> list[float]:
        if self.plus_table:
            return plus_table_weights(self.plus_table, layers)
        if self.block_dict is not None:
            return dict_weights(self.block_dict, layers)
        weights = preset_weights(self.preset, layers, self.style, self.composition)
        return table_weights(list(self.table), layers, weights) if self.table else weights

    def resolve(self, layers: tuple[BlockKey, ...], weight: float) -> ResolvedWeights:
        """The Apply weight as it is, with one multiplier per layer; no layer swaps to the negative."""
        return ResolvedWeights(weight, self.for_layers(layers), None)


def resolve_layer_weights(layer_weights: LayerWeights | None, layers: tuple[BlockKey, ...],
                          weight: float) -> ResolvedWeights:
    """What Apply passes on for its optional layer_weights input (a LayerWeights or a PlusWeightType)."""
    if layer_weights is None:
        return ResolvedWeights(weight, None, None)
    return layer_weights.resolve(layers, weight)
