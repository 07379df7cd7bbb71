"""The ComfyUI face of the pack, in pipeline order:

    load.py  ->  encode.py, embeds.py  ->  apply.py (+ layer_weights.py)  ->  comfy_seam/
    (adapter)    (CLIP encodings)          (image tokens, controls)           (patched MODEL)

`comfy_seam/` is the only package that touches ComfyUI's internals; `widgets.py` holds the
inputs shared by several nodes.
"""

from . import comfy_seam
from .apply import ApplyIPAdapter, ApplyIPAdapterFaceID, IPAdapterAllInOne, IPAdapterStyleComposition
from .embeds import IPAdapterCombineEmbeds, IPAdapterLoadEmbeds, IPAdapterSaveEmbeds
from .encode import EncodeIPAdapterFace, EncodeIPAdapterImage, IPAdapterNoiseImage
from .encode_siglip import EncodeIPAdapterSigLIPPooled
from .layer_weights import IPAdapterLayerWeights
from .load import LoadInsightFace, LoadIPAdapter, LoadIPAdapterAuto, LoadIPAdapterFaceIDAuto
from .prep_image import IPAdapterPrepImage
from .weight_types import IPAdapterWeightType

comfy_seam.check_comfyui()
comfy_seam.register_folders()
comfy_seam.register_routes()

# Ids are our own (another popular pack owns the IPAdapter* names without "Exact").
NODES = {
    "IPAdapterExactLoader": (LoadIPAdapter, "Load IP-Adapter"),
    "IPAdapterExactAutoLoader": (LoadIPAdapterAuto, "Load IP-Adapter (auto)"),
    "IPAdapterExactFaceIDAutoLoader": (LoadIPAdapterFaceIDAuto, "Load IP-Adapter FaceID (auto)"),
    "IPAdapterExactEncode": (EncodeIPAdapterImage, "IP-Adapter Encode Image"),
    "IPAdapterExactEncodeSigLIPPooled": (EncodeIPAdapterSigLIPPooled, "IP-Adapter Encode Image (SigLIP pooled)"),
    "IPAdapterExactApply": (ApplyIPAdapter, "Apply IP-Adapter"),
    "IPAdapterExactSimple": (IPAdapterAllInOne, "IP-Adapter (all in one)"),
    "IPAdapterExactLayerWeights": (IPAdapterLayerWeights, "IP-Adapter Layer Weights"),
    "IPAdapterExactWeightType": (IPAdapterWeightType, "IP-Adapter Weight Type"),
    "IPAdapterExactStyleComposition": (IPAdapterStyleComposition, "IP-Adapter Style & Composition"),
    "IPAdapterExactCombineEmbeds": (IPAdapterCombineEmbeds, "IP-Adapter Combine Embeds"),
    "IPAdapterExactNoise": (IPAdapterNoiseImage, "IP-Adapter Noise Image"),
    "IPAdapterExactPrepImage": (IPAdapterPrepImage, "IP-Adapter Prep Image"),
    "IPAdapterExactSaveEmbeds": (IPAdapterSaveEmbeds, "Save IP-Adapter Embeds"),
    "IPAdapterExactLoadEmbeds": (IPAdapterLoadEmbeds, "Load IP-Adapter Embeds"),
    "IPAdapterExactLoadInsightFace": (LoadInsightFace, "Load InsightFace"),
    "IPAdapterExactEncodeFace": (EncodeIPAdapterFace, "IP-Adapter Encode Face"),
    "IPAdapterExactApplyFaceID": (ApplyIPAdapterFaceID, "Apply IP-Adapter FaceID"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}
