"""Writes the UI-format workflows in workflows/ from the short graph descriptions below.

UI workflows (what users drag into ComfyUI) are verbose: node positions, slot lists, links
in two places, widget values in the order of each node's inputs. Writing them by hand drifts
from the nodes; here each is a few lines and the node definitions (ComfyUI's and this
pack's INPUT_TYPES) supply the rest. Run after changing a node's inputs:

    .venv/bin/python scripts/build_workflows.py

The files are committed; the tests convert them to API format and run them in a real server.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_FINETUNE = "dreamshaper_8.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
NEGATIVE = "blurry, lowres, watermark, text"
FACE_PACK = "buffalo_l"
INSIGHTFACE = ("FaceID finds the face with insightface: `pip install insightface onnxruntime` (NVIDIA GPU: "
               "`onnxruntime-gpu` instead of `onnxruntime`) in ComfyUI's Python, then restart ComfyUI. Its "
               f"model pack: unpack `{FACE_PACK}` into `models/insightface/models/{FACE_PACK}/` (`det_10g.onnx`, "
               "`w600k_r50.onnx`, ...).")


def load_node_classes() -> dict:
    """ComfyUI's node classes plus this pack's, imported in-process (CPU, no server)."""
    runpy.run_path(str(REPO / "tests" / "harness" / "imports.py"))["setup"]()
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(str(REPO)))
    return nodes.NODE_CLASS_MAPPINGS


@dataclass
class Node:
    graph: Graph
    id: int
    type: str
    definition: dict
    outputs: list[tuple[str, str]]
    title: str | None = None
    values: dict = field(default_factory=dict)

    def out(self, name: str | int) -> tuple[Node, int]:
        if isinstance(name, int):
            return self, name
        names = [n for n, _ in self.outputs]
        return self, names.index(name)


class Graph:
    def __init__(self, classes: dict, title: str):
        self.classes, self.title = classes, title
        self.nodes: list[Node] = []
        self.notes: list[tuple[str, str]] = []

    def add(self, node_type: str, title: str | None = None, **values) -> Node:
        cls = self.classes[node_type]
        definition = cls.INPUT_TYPES()
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = list(zip(names, cls.RETURN_TYPES, strict=True))
        node = Node(self, len(self.nodes) + 1, node_type, definition, outputs, title, values)
        self.nodes.append(node)
        return node

    def note(self, text: str) -> None:
        self.notes.append((self.title, text))

    def _inputs(self, node: Node) -> list[tuple[str, object, dict]]:
        out = []
        for section in ("required", "optional"):
            for name, spec in node.definition.get(section, {}).items():
                out.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
        return out

    def to_ui(self) -> dict:
        links, ui_nodes = [], []
        depth: dict[int, int] = {}
        for node in self.nodes:  # nodes are added after their inputs
            sources = [v[0].id for v in node.values.values() if isinstance(v, tuple)]
            depth[node.id] = 1 + max((depth[s] for s in sources), default=-1)
        column_y: dict[int, int] = {}
        outputs_links: dict[tuple[int, int], list[int]] = {}
        for node in self.nodes:
            inputs, widgets = [], []
            unknown = set(node.values) - {name for name, _, _ in self._inputs(node)}
            if unknown:
                raise KeyError(f"{node.type} has no input {sorted(unknown)}")
            for name, kind, options in self._inputs(node):
                value = node.values.get(name)
                is_widget = (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput")
                if isinstance(value, tuple):
                    source, slot = value
                    link_id = len(links) + 1
                    links.append([link_id, source.id, slot, node.id, len(inputs), source.outputs[slot][1]])
                    outputs_links.setdefault((source.id, slot), []).append(link_id)
                    is_combo = isinstance(kind, (list, tuple))
                    entry = {"name": name, "type": "COMBO" if is_combo else kind, "link": link_id}
                    if is_widget:  # a widget converted to an input keeps its (unused) value
                        entry["widget"] = {"name": name}
                        widgets.append(options.get("default", kind[0] if is_combo and kind else None))
                    inputs.append(entry)
                    continue
                if not is_widget:
                    continue
                if value is None:
                    value = options.get("default", kind[0] if isinstance(kind, (list, tuple)) and kind else None)
                widgets.append(value)
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
            col = depth[node.id]
            y = column_y.get(col, 60)
            height = 60 + 26 * (len(inputs) + len(widgets) + len(node.outputs))
            if node.type in ("LoadImage", "PreviewImage"):
                height += 240  # room for the picture preview the frontend draws inside the node
            column_y[col] = y + height + 40
            ui = {
                "id": node.id, "type": node.type, "pos": [40 + 340 * col, y], "size": [300, height],
                "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(node.outputs)],
                "properties": {"Node name for S&R": node.type}, "widgets_values": widgets,
            }
            if node.title:
                ui["title"] = node.title
            ui_nodes.append(ui)
        for ui in ui_nodes:
            for slot, output in enumerate(ui["outputs"]):
                output["links"] = outputs_links.get((ui["id"], slot), [])
        order = sorted(ui_nodes, key=lambda n: depth[n["id"]])
        for i, ui in enumerate(order):
            ui["order"] = i
        for i, (title, text) in enumerate(self.notes):
            ui_nodes.append({
                "id": len(self.nodes) + i + 1, "type": "MarkdownNote", "pos": [40, -260 - 10 * i], "size": [640, 220],
                "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [f"## {title}\n\n{text}"], "title": "Read me",
            })
        # ds: the opening view; the offset keeps the first column clear of the frontend's side bar
        # and the "Read me" note below its top bar.
        return {
            "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [100, 330]}}, "version": 0.4,
        }


# ----------------------------------------------------------------------------------------------
# The workflows
# ----------------------------------------------------------------------------------------------

def sd15_base(g: Graph, checkpoint: str = SD15):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    return ckpt, g.add("CLIPVisionLoader", clip_name=VIT_H)


def sample(g: Graph, model, clip, prompt: str, prefix: str, latent=None, width=512, height=512,
           batch=1, denoise=1.0, positive=None, negative=None, vae=None, steps=20):
    positive = positive or g.add("CLIPTextEncode", "Prompt", text=prompt, clip=clip).out(0)
    negative = negative or g.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=clip).out(0)
    if latent is None:
        latent = g.add("EmptyLatentImage", width=width, height=height, batch_size=batch).out(0)
    sampler = g.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                    seed=42, steps=steps, cfg=6.5, sampler_name="dpmpp_2m", scheduler="karras", denoise=denoise)
    image = g.add("VAEDecode", samples=sampler.out(0), vae=vae).out(0)
    g.add("SaveImage", images=image, filename_prefix=prefix)


def adapter_chain(g: Graph, model, clip_vision, image, adapter="ip-adapter_sd15.safetensors", weight=0.8, **apply):
    loader = g.add("IPAdapterExactLoader", ipadapter_file=adapter)
    embeds = g.add("IPAdapterExactEncode", ipadapter=loader.out(0), clip_vision=clip_vision, image=image)
    return g.add("IPAdapterExactApply", model=model, ipadapter=loader.out(0), image_embeds=embeds.out(0),
                 weight=weight, **apply).out(0), loader, embeds


def reference(g: Graph, name: str = "ipadapter_reference.png", title: str = "Reference image"):
    return g.add("LoadImage", title, image=name).out(0)


def basic_image_prompt(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("The reference image steers the picture through IP-Adapter; the text prompt is left almost empty.\n\n"
           f"Files: `models/checkpoints/` an SD1.5 checkpoint, `models/ipadapter/ip-adapter_sd15.safetensors`, "
           f"`models/clip_vision/{VIT_H}`. Pick your own picture in *Reference image*.")
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g), weight=1.0)
    sample(g, model, ckpt.out("CLIP"), "best quality", "ipadapter_basic", vae=ckpt.out("VAE"))


def image_and_text(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Multimodal prompt: the image gives the subject's look, the text changes the scene. Lower the weight "
           "(0.5-0.7) to give the text more room.")
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g), weight=0.6)
    sample(g, model, ckpt.out("CLIP"), "the same person on a snowy mountain top, wearing a red hat",
           "ipadapter_image_text", vae=ckpt.out("VAE"))


def two_checkpoints(g: Graph):
    g.note("One adapter file serves any fine-tune of the same base model: the same reference on two SD1.5 "
           "checkpoints. The adapter weights are loaded once and shared.")
    vision = g.add("CLIPVisionLoader", clip_name=VIT_H)
    image = reference(g)
    loader = g.add("IPAdapterExactLoader", ipadapter_file="ip-adapter_sd15.safetensors")
    embeds = g.add("IPAdapterExactEncode", ipadapter=loader.out(0), clip_vision=vision.out(0), image=image)
    for name, prefix in ((SD15, "ipadapter_ckpt_a"), (SD15_FINETUNE, "ipadapter_ckpt_b")):
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=name)
        model = g.add("IPAdapterExactApply", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                      image_embeds=embeds.out(0), weight=0.8).out(0)
        sample(g, model, ckpt.out("CLIP"), "best quality", prefix, vae=ckpt.out("VAE"))


def with_controlnet(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("IP-Adapter gives content and style, ControlNet the structure: the hint image fixes the layout.")
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g), weight=0.8)
    clip = ckpt.out("CLIP")
    pos = g.add("CLIPTextEncode", "Prompt", text="best quality", clip=clip).out(0)
    neg = g.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=clip).out(0)
    control = g.add("ControlNetLoader", control_net_name="control_v11p_sd15_canny.safetensors")
    hint = g.add("LoadImage", "Control hint (edges)", image="control_hint.png").out(0)
    applied = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=control.out(0), image=hint,
                    strength=0.9, start_percent=0.0, end_percent=1.0, vae=ckpt.out("VAE"))
    sample(g, model, clip, "", "ipadapter_controlnet", positive=applied.out(0), negative=applied.out(1),
           vae=ckpt.out("VAE"))


def with_lora(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("A LoRA can sit before the adapter (top) or after it (bottom): the adapter patches attention, the "
           "LoRA patches weights, so both orders work.")
    image = reference(g)
    lora = g.add("LoraLoader", model=ckpt.out("MODEL"), clip=ckpt.out("CLIP"), lora_name="add_detail.safetensors",
                 strength_model=0.8, strength_clip=0.8)
    before, loader, embeds = adapter_chain(g, lora.out(0), vision.out(0), image, weight=0.8)
    sample(g, before, lora.out(1), "best quality", "ipadapter_lora_before", vae=ckpt.out("VAE"))
    applied = g.add("IPAdapterExactApply", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                    image_embeds=embeds.out(0), weight=0.8).out(0)
    after = g.add("LoraLoader", model=applied, clip=ckpt.out("CLIP"), lora_name="add_detail.safetensors",
                  strength_model=0.8, strength_clip=0.8)
    sample(g, after.out(0), after.out(1), "best quality", "ipadapter_lora_after", vae=ckpt.out("VAE"))


def image_to_image(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Image-to-image: the init picture is encoded and only partly re-noised (denoise 0.6); the reference "
           "image pulls it towards its look.")
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g), weight=0.7)
    init = g.add("LoadImage", "Init image", image="init_photo.png").out(0)
    latent = g.add("VAEEncode", pixels=init, vae=ckpt.out("VAE")).out(0)
    sample(g, model, ckpt.out("CLIP"), "best quality", "ipadapter_img2img", latent=latent, denoise=0.6,
           vae=ckpt.out("VAE"))


def inpainting(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Inpainting: only the masked square (centre) is redrawn, following the reference image.")
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g), weight=0.8)
    init = g.add("LoadImage", "Init image", image="init_photo.png").out(0)
    latent = g.add("VAEEncode", pixels=init, vae=ckpt.out("VAE")).out(0)
    empty = g.add("SolidMask", "Mask canvas", value=0.0, width=512, height=512).out(0)
    square = g.add("SolidMask", "Masked square", value=1.0, width=256, height=256).out(0)
    mask = g.add("MaskComposite", destination=empty, source=square, x=128, y=128, operation="add").out(0)
    masked = g.add("SetLatentNoiseMask", samples=latent, mask=mask).out(0)
    sample(g, model, ckpt.out("CLIP"), "best quality", "ipadapter_inpaint", latent=masked, vae=ckpt.out("VAE"))


def sdxl_style_transfer(g: Graph):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SDXL)
    vision = g.add("CLIPVisionLoader", clip_name=VIT_H)
    g.note("SDXL style transfer (InstantStyle): the style image acts only on output block 1, so its colours "
           "and textures come through without its content. Uses ip-adapter_sdxl_vit-h with the ViT-H encoder.")
    loader = g.add("IPAdapterExactLoader", ipadapter_file="ip-adapter_sdxl_vit-h.safetensors")
    image = reference(g, "ipadapter_style.png", "Style image")
    embeds = g.add("IPAdapterExactEncode", ipadapter=loader.out(0), clip_vision=vision.out(0), image=image)
    weights = g.add("IPAdapterExactLayerWeights", preset="style transfer")
    model = g.add("IPAdapterExactApply", model=ckpt.out("MODEL"), ipadapter=loader.out(0), image_embeds=embeds.out(0),
                  weight=1.0, layer_weights=weights.out(0)).out(0)
    sample(g, model, ckpt.out("CLIP"), "a cat sitting on a chair", "ipadapter_sdxl_style", width=1024, height=1024,
           vae=ckpt.out("VAE"))


def sdxl_style_and_composition(g: Graph):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SDXL)
    vision = g.add("CLIPVisionLoader", clip_name=VIT_H)
    g.note("Two references, two roles: the style image on the style layer (output 1), the composition image on "
           "the composition layer (input 8), each with its own weight.")
    loader = g.add("IPAdapterExactLoader", ipadapter_file="ip-adapter_sdxl_vit-h.safetensors")
    model = g.add("IPAdapterExactStyleComposition", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                  clip_vision=vision.out(0), image_style=reference(g, "ipadapter_style.png", "Style image"),
                  image_composition=reference(g, "ipadapter_composition.png", "Composition image"),
                  weight_style=1.0, weight_composition=0.8).out(0)
    sample(g, model, ckpt.out("CLIP"), "a lighthouse by the sea", "ipadapter_sdxl_style_composition",
           width=1024, height=1024, vae=ckpt.out("VAE"))


def two_adapters_stacked(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Two adapters stacked on one model: a plus adapter for detail and the base adapter for overall look. "
           "Each Apply adds its own image path; the second wraps the first.")
    first, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g),
                                adapter="ip-adapter-plus_sd15.safetensors", weight=0.6)
    second, _, _ = adapter_chain(g, first, vision.out(0), reference(g, "ipadapter_style.png", "Second reference"),
                                 weight=0.5)
    sample(g, second, ckpt.out("CLIP"), "best quality", "ipadapter_stacked", vae=ckpt.out("VAE"))


def regional_masks(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Regional prompting: one reference for the left half, another for the right half, each adapter "
           "limited by an attention mask.")
    empty = g.add("SolidMask", "Mask canvas", value=0.0, width=512, height=512).out(0)
    half = g.add("SolidMask", "Half", value=1.0, width=256, height=512).out(0)
    left = g.add("MaskComposite", "Left half", destination=empty, source=half, x=0, y=0, operation="add").out(0)
    right = g.add("InvertMask", "Right half", mask=left).out(0)
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g, title="Left reference"),
                                weight=0.9, attn_mask=left)
    model, _, _ = adapter_chain(g, model, vision.out(0), reference(g, "ipadapter_style.png", "Right reference"),
                                weight=0.9, attn_mask=right)
    sample(g, model, ckpt.out("CLIP"), "two people side by side", "ipadapter_regional", vae=ckpt.out("VAE"))


def several_images(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Several references: each is encoded, then Combine Embeds averages them (or concat / add / subtract / "
           "norm average).")
    loader = g.add("IPAdapterExactLoader", ipadapter_file="ip-adapter_sd15.safetensors")
    encoded = [g.add("IPAdapterExactEncode", ipadapter=loader.out(0), clip_vision=vision.out(0),
                     image=reference(g, name, title)).out(0)
               for name, title in (("ipadapter_reference.png", "Reference 1"), ("ipadapter_style.png", "Reference 2"))]
    combined = g.add("IPAdapterExactCombineEmbeds", embeds_1=encoded[0], embeds_2=encoded[1], method="average")
    model = g.add("IPAdapterExactApply", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                  image_embeds=combined.out(0), weight=0.8).out(0)
    sample(g, model, ckpt.out("CLIP"), "best quality", "ipadapter_several", vae=ckpt.out("VAE"))


def batch_one_per_latent(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("Batch: two references, two latents; with one_image_per_latent each latent follows its own reference "
           "(for batches and animation; with more latents than images the references repeat).")
    batch = g.add("ImageBatch", image1=reference(g), image2=reference(g, "ipadapter_style.png", "Reference 2")).out(0)
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), batch, weight=0.8, one_image_per_latent=True)
    sample(g, model, ckpt.out("CLIP"), "best quality", "ipadapter_batch", batch=2, vae=ckpt.out("VAE"))


def composition_block_dict(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note('Per-layer weights as a diffusers/InstantStyle dictionary: {"down": {"block_2": [0, 1]}} keeps only '
           "the composition layer (input 8), exactly as diffusers' set_ip_adapter_scale would.")
    weights = g.add("IPAdapterExactLayerWeights", preset="linear", block_dict='{"down": {"block_2": [0.0, 1.0]}}')
    model, _, _ = adapter_chain(g, ckpt.out("MODEL"), vision.out(0), reference(g), weight=1.0,
                                layer_weights=weights.out(0), start_at=0.0, end_at=0.8)
    sample(g, model, ckpt.out("CLIP"), "a house in a forest", "ipadapter_composition", vae=ckpt.out("VAE"))


def faceid_models(g: Graph, adapter: str):
    loader = g.add("IPAdapterExactLoader", ipadapter_file=adapter)
    return loader, g.add("IPAdapterExactLoadInsightFace", model_pack=FACE_PACK, provider="CPU")


def faceid_portrait_sd15(g: Graph):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    g.note("FaceID Portrait: several pictures of one person (other angles and light help) give one identity. "
           "The largest face of each picture is used, all of them together (16 tokens each); no CLIP vision "
           "model and no LoRA. ImageBatch fits the later pictures to the first one's size (scaled and "
           "centre-cropped): use pictures of one size.\n\n"
           "Files: `models/ipadapter/ip-adapter-faceid-portrait_sd15.bin`, an SD1.5 checkpoint. " + INSIGHTFACE)
    loader, analysis = faceid_models(g, "ip-adapter-faceid-portrait_sd15.bin")
    pictures = [reference(g, f"ipadapter_face_{i}.png", f"Face picture {i}") for i in (1, 2, 3)]
    batch = g.add("ImageBatch", image1=pictures[0], image2=pictures[1]).out(0)
    batch = g.add("ImageBatch", image1=batch, image2=pictures[2]).out(0)
    faces = g.add("IPAdapterExactEncodeFace", ipadapter=loader.out(0), insightface=analysis.out(0), image=batch)
    model = g.add("IPAdapterExactApplyFaceID", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                  image_embeds=faces.out("image_embeds"), weight=1.0).out(0)
    sample(g, model, ckpt.out("CLIP"), "portrait photo of a person in a garden, soft light, best quality",
           "ipadapter_faceid_portrait", vae=ckpt.out("VAE"))


def faceid_plus_v2_sdxl(g: Graph):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SDXL)
    vision = g.add("CLIPVisionLoader", clip_name=VIT_H)
    g.note("FaceID Plus v2 on SDXL: the face's identity (ArcFace) plus the CLIP ViT-H encoding of the aligned face. "
           "`faceid_plus_version` must be v2 for a plusv2 file (v1 and v2 files hold the same weights); "
           "`face_structure` weighs the face-crop path (1.0 as the reference). `lora_strength` 1.0 applies the LoRA "
           "stored in the .bin, as the reference does: do not also load `ip-adapter-faceid-plusv2_sdxl_lora."
           "safetensors` (or set lora_strength to 0). *Faces found* shows the aligned faces that were used.\n\n"
           "Files: `models/ipadapter/ip-adapter-faceid-plusv2_sdxl.bin`, "
           f"`models/clip_vision/{VIT_H}`, an SDXL checkpoint. " + INSIGHTFACE)
    loader, analysis = faceid_models(g, "ip-adapter-faceid-plusv2_sdxl.bin")
    picture = reference(g, "ipadapter_face_1.png", "Face picture")
    faces = g.add("IPAdapterExactEncodeFace", ipadapter=loader.out(0), insightface=analysis.out(0), image=picture,
                  clip_vision=vision.out(0))
    g.add("PreviewImage", "Faces found", images=faces.out("faces"))
    model = g.add("IPAdapterExactApplyFaceID", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                  image_embeds=faces.out("image_embeds"), weight=1.0, faceid_plus_version="v2",
                  face_structure=1.0, lora_strength=1.0).out(0)
    sample(g, model, ckpt.out("CLIP"), "photo of a person reading in a library, best quality",
           "ipadapter_faceid_plusv2_sdxl", width=1024, height=1024, vae=ckpt.out("VAE"))


def face_and_style(g: Graph):
    ckpt, vision = sd15_base(g)
    g.note("A face and a style at once: FaceID gives the identity, a plain IP-Adapter stacked on the same model "
           "gives the look of the style image. Lower the style weight if the face fades.\n\n"
           "Files: `models/ipadapter/ip-adapter-faceid_sd15.bin` (its LoRA is inside: lora_strength), "
           f"`models/ipadapter/ip-adapter_sd15.safetensors`, `models/clip_vision/{VIT_H}`, an SD1.5 checkpoint. "
           + INSIGHTFACE)
    loader, analysis = faceid_models(g, "ip-adapter-faceid_sd15.bin")
    picture = reference(g, "ipadapter_face_1.png", "Face picture")
    faces = g.add("IPAdapterExactEncodeFace", ipadapter=loader.out(0), insightface=analysis.out(0), image=picture)
    model = g.add("IPAdapterExactApplyFaceID", model=ckpt.out("MODEL"), ipadapter=loader.out(0),
                  image_embeds=faces.out("image_embeds"), weight=0.9, lora_strength=1.0).out(0)
    model, _, _ = adapter_chain(g, model, vision.out(0), reference(g, "ipadapter_style.png", "Style image"),
                                weight=0.5)
    sample(g, model, ckpt.out("CLIP"), "portrait of a person, best quality", "ipadapter_face_and_style",
           vae=ckpt.out("VAE"))


WORKFLOWS = {
    "basic_image_prompt": ("Basic image prompt", basic_image_prompt),
    "image_and_text": ("Image + text prompt", image_and_text),
    "two_checkpoints_one_adapter": ("One adapter, two checkpoints", two_checkpoints),
    "with_controlnet": ("IP-Adapter + ControlNet", with_controlnet),
    "with_lora": ("IP-Adapter + LoRA, before and after", with_lora),
    "image_to_image": ("Image to image", image_to_image),
    "inpainting": ("Inpainting", inpainting),
    "sdxl_style_transfer": ("SDXL style transfer", sdxl_style_transfer),
    "sdxl_style_and_composition": ("SDXL style and composition", sdxl_style_and_composition),
    "two_adapters_stacked": ("Two adapters stacked", two_adapters_stacked),
    "regional_masks": ("Regional masks", regional_masks),
    "several_images": ("Several reference images", several_images),
    "batch_one_per_latent": ("One reference per latent", batch_one_per_latent),
    "composition_block_dict": ("Composition via a block dictionary", composition_block_dict),
    "faceid_portrait_sd15": ("FaceID Portrait (SD1.5), several face pictures", faceid_portrait_sd15),
    "faceid_plus_v2_sdxl": ("FaceID Plus v2 (SDXL)", faceid_plus_v2_sdxl),
    "face_and_style": ("Face (FaceID) + style (IP-Adapter)", face_and_style),
}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    classes = load_node_classes()
    out.mkdir(exist_ok=True)
    for stem, (title, build) in WORKFLOWS.items():
        graph = Graph(classes, title)
        build(graph)
        (out / f"{stem}.json").write_text(json.dumps(graph.to_ui(), indent=1) + "\n")
    print(f"wrote {len(WORKFLOWS)} workflows to {out}")


if __name__ == "__main__":
    main()
