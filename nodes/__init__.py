"""The ComfyUI face of the pack: node classes and their registration."""

from .apply import ApplyIPAdapter, IPAdapterAllInOne
from .encode import EncodeIPAdapterImage
from .host import register_model_folder
from .loader import LoadIPAdapter

register_model_folder()

NODE_CLASS_MAPPINGS = {
    "IPAdapterExactLoader": LoadIPAdapter,
    "IPAdapterExactEncode": EncodeIPAdapterImage,
    "IPAdapterExactApply": ApplyIPAdapter,
    "IPAdapterExactSimple": IPAdapterAllInOne,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterExactLoader": "Load IP-Adapter",
    "IPAdapterExactEncode": "IP-Adapter Encode Image",
    "IPAdapterExactApply": "Apply IP-Adapter",
    "IPAdapterExactSimple": "IP-Adapter (all in one)",
}
