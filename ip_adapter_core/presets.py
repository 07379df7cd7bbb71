"""Presets of the auto loader: what a preset needs, per base model, and where the published files come from.

A preset names a kind of adapter ("plus face"), not a file. What a file *is* (variant, base model, encoder)
is read from its tensors (ip_adapter_core/layout.py); a preset lists which of those a file must have. Some
published files share one layout and differ only in training (light and standard; plus and plus face; FaceID
Plus v1 and v2): their tensors qualify them equally, and among qualifying files the published name of the
preset goes first (see `rank_key`), then the newest file.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import AdapterSpec

H94 = "https://huggingface.co/h94/IP-Adapter/resolve/main"
H94_FACEID = "https://huggingface.co/h94/IP-Adapter-FaceID/resolve/main"


@dataclass(frozen=True)
class EncoderFile:
    """A CLIP vision model as published: the tower it is, its usual file name and where to get it."""

    tower: str  # "ViT-H", "ViT-bigG", "ViT-L", "SigLIP-384"
    name: str
    url: str


ENCODERS = {
    "ViT-H": EncoderFile("ViT-H", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                         f"{H94}/models/image_encoder/model.safetensors"),
    "ViT-bigG": EncoderFile("ViT-bigG", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                            f"{H94}/sdxl_models/image_encoder/model.safetensors"),
    "ViT-L": EncoderFile("ViT-L", "clip-vit-large-patch14.safetensors",
                         "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors"),
}


@dataclass(frozen=True)
class AdapterFile:
    """One published adapter: what its tensors must say, its name and where to get it."""

    variant: str  # AdapterSpec.variant
    encoder: str  # AdapterSpec.encoder ("ArcFace" for FaceID)
    name: str
    url: str
    name_hint: str = ""  # a word of the published name that tells this file from same-layout ones ("light")
    avoid_hints: tuple[str, ...] = ()  # words that mark a same-layout file of another preset ("face")
    crop_encoder: str = ""  # FaceID Plus: the CLIP tower for the face crop


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    files: dict[str, AdapterFile]  # base model ("SD1.5", "SDXL") -> the adapter file
    faceid: bool = False

    def for_base(self, base_model: str) -> AdapterFile:
        if base_model not in self.files:
            bases = " and ".join(self.files)
            raise ValueError(f"the preset '{self.label}' exists for {bases} only; this model is {base_model}")
        return self.files[base_model]


def _sd15(name: str) -> str:
    return f"{H94}/models/{name}"


def _sdxl(name: str) -> str:
    return f"{H94}/sdxl_models/{name}"


def _faceid(name: str) -> str:
    return f"{H94_FACEID}/{name}"


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("light", "light (SD1.5 only, low strength)", {
        "SD1.5": AdapterFile("base", "ViT-H", "ip-adapter_sd15_light_v11.bin", _sd15("ip-adapter_sd15_light_v11.bin"),
                             name_hint="light")}),
    Preset("standard", "standard (medium strength)", {
        "SD1.5": AdapterFile("base", "ViT-H", "ip-adapter_sd15.safetensors", _sd15("ip-adapter_sd15.safetensors"),
                             avoid_hints=("light",)),
        "SDXL": AdapterFile("base", "ViT-H", "ip-adapter_sdxl_vit-h.safetensors",
                            _sdxl("ip-adapter_sdxl_vit-h.safetensors"))}),
    Preset("vit-G", "ViT-G (medium strength)", {
        "SD1.5": AdapterFile("base", "ViT-bigG", "ip-adapter_sd15_vit-G.safetensors",
                             _sd15("ip-adapter_sd15_vit-G.safetensors")),
        "SDXL": AdapterFile("base", "ViT-bigG", "ip-adapter_sdxl.safetensors", _sdxl("ip-adapter_sdxl.safetensors"))}),
    Preset("plus", "plus (high strength)", {
        "SD1.5": AdapterFile("plus", "ViT-H", "ip-adapter-plus_sd15.safetensors",
                             _sd15("ip-adapter-plus_sd15.safetensors"), avoid_hints=("face",)),
        "SDXL": AdapterFile("plus", "ViT-H", "ip-adapter-plus_sdxl_vit-h.safetensors",
                            _sdxl("ip-adapter-plus_sdxl_vit-h.safetensors"), avoid_hints=("face",))}),
    Preset("plus face", "plus face (portraits)", {
        "SD1.5": AdapterFile("plus", "ViT-H", "ip-adapter-plus-face_sd15.safetensors",
                             _sd15("ip-adapter-plus-face_sd15.safetensors"), name_hint="face"),
        "SDXL": AdapterFile("plus", "ViT-H", "ip-adapter-plus-face_sdxl_vit-h.safetensors",
                            _sdxl("ip-adapter-plus-face_sdxl_vit-h.safetensors"), name_hint="face")}),
    Preset("full face", "full face (SD1.5 only, stronger portraits)", {
        "SD1.5": AdapterFile("full-face", "ViT-H", "ip-adapter-full-face_sd15.safetensors",
                             _sd15("ip-adapter-full-face_sd15.safetensors"))}),
    Preset("faceid", "FaceID", {
        "SD1.5": AdapterFile("faceid", "ArcFace", "ip-adapter-faceid_sd15.bin", _faceid("ip-adapter-faceid_sd15.bin")),
        "SDXL": AdapterFile("faceid", "ArcFace", "ip-adapter-faceid_sdxl.bin", _faceid("ip-adapter-faceid_sdxl.bin"))},
        faceid=True),
    Preset("faceid plus", "FaceID Plus (SD1.5 only)", {
        "SD1.5": AdapterFile("faceid-plus", "ArcFace", "ip-adapter-faceid-plus_sd15.bin",
                             _faceid("ip-adapter-faceid-plus_sd15.bin"), avoid_hints=("plusv2", "plus_v2", "v2"),
                             crop_encoder="ViT-H")}, faceid=True),
    Preset("faceid plus v2", "FaceID Plus v2", {
        "SD1.5": AdapterFile("faceid-plus", "ArcFace", "ip-adapter-faceid-plusv2_sd15.bin",
                             _faceid("ip-adapter-faceid-plusv2_sd15.bin"), name_hint="v2", crop_encoder="ViT-H"),
        "SDXL": AdapterFile("faceid-plus", "ArcFace", "ip-adapter-faceid-plusv2_sdxl.bin",
                            _faceid("ip-adapter-faceid-plusv2_sdxl.bin"), name_hint="v2", crop_encoder="ViT-H")},
        faceid=True),
    Preset("faceid portrait", "FaceID Portrait (style transfer)", {
        "SD1.5": AdapterFile("faceid-portrait", "ArcFace", "ip-adapter-faceid-portrait-v11_sd15.bin",
                             _faceid("ip-adapter-faceid-portrait-v11_sd15.bin")),
        "SDXL": AdapterFile("faceid-portrait", "ArcFace", "ip-adapter-faceid-portrait_sdxl.bin",
                            _faceid("ip-adapter-faceid-portrait_sdxl.bin"))}, faceid=True),
    Preset("faceid portrait unnorm", "FaceID Portrait unnorm (SDXL only, strong)", {
        "SDXL": AdapterFile("faceid-portrait-unnorm", "ArcFace", "ip-adapter-faceid-portrait_sdxl_unnorm.bin",
                            _faceid("ip-adapter-faceid-portrait_sdxl_unnorm.bin"))}, faceid=True),
)}

STANDARD_PRESETS = tuple(name for name, p in PRESETS.items() if not p.faceid)
FACEID_PRESETS = tuple(name for name, p in PRESETS.items() if p.faceid)
INSIGHTFACE_PACK = "buffalo_l"
INSIGHTFACE_URL = "https://github.com/deepinsight/insightface/releases (buffalo_l.zip)"


def rank_key(wanted: AdapterFile, name: str, mtime_ns: int) -> tuple[int, int, int, str]:
    """Sort key among files whose tensors already qualify: the published name first, then a name carrying
    the preset's word (and none of another preset's), then the newest file, then the name."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    exact = 0 if base == wanted.name.lower() else 1
    hinted = (wanted.name_hint and wanted.name_hint.lower() in base) or not wanted.name_hint
    avoided = any(word in base for word in wanted.avoid_hints)
    return exact, 0 if hinted and not avoided else 1, -mtime_ns, name


def encoder_rank_key(wanted: EncoderFile, name: str, mtime_ns: int) -> tuple[int, int, str]:
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    return 0 if base == wanted.name.lower() else 1, -mtime_ns, name


@dataclass(frozen=True)
class Candidate:
    """A file found in a model folder, with what its header says it is."""

    name: str
    mtime_ns: int
    spec: AdapterSpec | None = None  # adapters
    tower: str = ""  # CLIP vision files
    kv_rows: tuple[int, ...] = ()  # UNet adapters: the layer widths it was made for (empty: not known)


@dataclass(frozen=True)
class Choice:
    file: Candidate
    note: str = ""  # said in the info output and the log when the pick needs a word of explanation


def adapter_fits(wanted: AdapterFile, base_model: str, spec: AdapterSpec | None) -> bool:
    """Whether a file's tensors make it the preset's adapter for `base_model`."""
    return (spec is not None and spec.variant == wanted.variant and spec.base_model == base_model
            and spec.encoder == wanted.encoder and spec.crop_encoder == wanted.crop_encoder)


def widths_fit(candidate: Candidate, model_rows: tuple[int, ...] | None) -> bool:
    """Whether an adapter's layer widths are the model's (None or empty on either side: not checked here)."""
    return not model_rows or not candidate.kv_rows or candidate.kv_rows == model_rows


def pick_adapter(wanted: AdapterFile, base_model: str, candidates: list[Candidate],
                 model_rows: tuple[int, ...] | None = None) -> Choice | None:
    """The preset's adapter among `candidates`, by tensors first, then by `rank_key`; None if none fits.

    model_rows: the model's cross-attention widths in the adapter's layer order, when known: a file made
    for a UNet of other widths (a pruned or resized fine-tune's adapter) does not fit.
    A file whose name carries another same-layout preset's word ("light" for standard) is picked only when
    no other file fits, and the choice then says so."""
    fits = sorted((c for c in candidates if adapter_fits(wanted, base_model, c.spec) and widths_fit(c, model_rows)),
                  key=lambda c: rank_key(wanted, c.name, c.mtime_ns))
    if not fits:
        return None
    best = fits[0]
    if rank_key(wanted, best.name, best.mtime_ns)[1]:
        return Choice(best, f"{best.name} has the right layout but its name suggests another training of it "
                            f"(the published file is {wanted.name}); no better match was found")
    return Choice(best)


def pick_encoder(wanted: EncoderFile, candidates: list[Candidate]) -> Choice | None:
    fits = sorted((c for c in candidates if c.tower == wanted.tower),
                  key=lambda c: encoder_rank_key(wanted, c.name, c.mtime_ns))
    return Choice(fits[0]) if fits else None


def near_misses(wanted: AdapterFile, base_model: str, candidates: list[Candidate],
                model_rows: tuple[int, ...] | None = None) -> list[str]:
    """Files of the preset's variant made for another base model, encoder or UNet width: named in the error,
    never picked."""
    out = []
    for c in candidates:
        spec = c.spec
        if spec is None or spec.variant != wanted.variant:
            continue
        if not adapter_fits(wanted, base_model, spec):
            out.append(f"{c.name} is a {spec.variant} adapter for {spec.base_model} with {spec.encoder}, not for "
                       f"{base_model} with {wanted.encoder}")
        elif not widths_fit(c, model_rows):
            out.append(f"{c.name} is a {spec.variant} {spec.base_model} adapter made for a UNet of other layer "
                       f"widths ({sorted(set(c.kv_rows))} vs this model's {sorted(set(model_rows or ()))})")
    return out
