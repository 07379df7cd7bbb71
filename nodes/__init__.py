"""The ComfyUI face of the pack: node classes and their registration."""

from .apply import ApplyIPAdapter, IPAdapterAllInOne
from .controls import (
    IPAdapterCombineEmbeds,
    IPAdapterLayerWeights,
    IPAdapterLoadEmbeds,
    IPAdapterNoiseImage,
    IPAdapterSaveEmbeds,
    IPAdapterStyleComposition,
    register_embeds_folder,
)
from .encode import EncodeIPAdapterImage
from .host import register_model_folder
from .loader import LoadIPAdapter
from .routes import register_routes

register_model_folder()
register_embeds_folder()
register_routes()

# Ids are our own (another popular pack owns the IPAdapter* names without "Exact").
NODES = {
    "IPAdapterExactLoader": (LoadIPAdapter, "Load IP-Adapter"),
    "IPAdapterExactEncode": (EncodeIPAdapterImage, "IP-Adapter Encode Image"),
    "IPAdapterExactApply": (ApplyIPAdapter, "Apply IP-Adapter"),
    "IPAdapterExactSimple": (IPAdapterAllInOne, "IP-Adapter (all in one)"),
    "IPAdapterExactLayerWeights": (IPAdapterLayerWeights, "IP-Adapter Layer Weights"),
    "IPAdapterExactStyleComposition": (IPAdapterStyleComposition, "IP-Adapter Style & Composition"),
    "IPAdapterExactCombineEmbeds": (IPAdapterCombineEmbeds, "IP-Adapter Combine Embeds"),
    "IPAdapterExactNoise": (IPAdapterNoiseImage, "IP-Adapter Noise Image"),
    "IPAdapterExactSaveEmbeds": (IPAdapterSaveEmbeds, "Save IP-Adapter Embeds"),
    "IPAdapterExactLoadEmbeds": (IPAdapterLoadEmbeds, "Load IP-Adapter Embeds"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}
