"""A trimmed copy of ComfyUI 0.3.75's GET /object_info for the nodes the converter tests use
(tests/unit/test_workflow_convert.py, tests/server/test_server_e2e.py)."""

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["simple", "karras", "normal"]

OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [[]]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"], "display_name": "Load Checkpoint",
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                               "clip": ["CLIP"]}},
        "input_order": {"required": ["text", "clip"]},
        "output": ["CONDITIONING"], "display_name": "CLIP Text Encode (Prompt)",
    },
    "EmptyLatentImage": {
        "input": {"required": {"width": ["INT", {"default": 512, "min": 16, "step": 8}],
                               "height": ["INT", {"default": 512, "min": 16, "step": 8}],
                               "batch_size": ["INT", {"default": 1, "min": 1}]}},
        "input_order": {"required": ["width", "height", "batch_size"]},
        "output": ["LATENT"], "display_name": "Empty Latent Image",
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL"],
            "seed": ["INT", {"default": 0, "min": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [SAMPLERS],
            "scheduler": [SCHEDULERS],
            "positive": ["CONDITIONING"],
            "negative": ["CONDITIONING"],
            "latent_image": ["LATENT"],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
        }},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "display_name": "KSampler",
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}},
        "input_order": {"required": ["samples", "vae"]},
        "output": ["IMAGE"], "display_name": "VAE Decode",
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]},
        "output": [], "display_name": "Save Image",
    },
    "PreviewImage": {
        "input": {"required": {"images": ["IMAGE"]}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        "input_order": {"required": ["images"], "hidden": ["prompt", "extra_pnginfo"]},
        "output": [], "display_name": "Preview Image",
    },
    "LoadImage": {
        "input": {"required": {"image": [[], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "display_name": "Load Image",
    },
    "ImageInvert": {
        "input": {"required": {"image": ["IMAGE"]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE"], "display_name": "Invert Image",
    },
    "ImageStitch": {
        "input": {"required": {"image1": ["IMAGE"],
                               "direction": [["right", "down", "left", "up"], {"default": "right"}],
                               "match_image_size": ["BOOLEAN", {"default": True}],
                               "spacing_width": ["INT", {"default": 0, "min": 0, "max": 1024, "step": 2}],
                               "spacing_color": [["white", "black", "red", "green", "blue"], {"default": "white"}]},
                  "optional": {"image2": ["IMAGE"]}},
        "input_order": {"required": ["image1", "direction", "match_image_size", "spacing_width", "spacing_color"],
                        "optional": ["image2"]},
        "output": ["IMAGE"], "display_name": "Image Stitch",
    },
    "ControlNetApplyAdvanced": {
        "input": {"required": {"positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                               "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
                               "strength": ["FLOAT", {"default": 1.0}],
                               "start_percent": ["FLOAT", {"default": 0.0}],
                               "end_percent": ["FLOAT", {"default": 1.0}]},
                  "optional": {"vae": ["VAE"]}},
        "input_order": {"required": ["positive", "negative", "control_net", "image", "strength", "start_percent",
                                     "end_percent"], "optional": ["vae"]},
        "output": ["CONDITIONING", "CONDITIONING"], "display_name": "Apply ControlNet",
    },
    "PrimitiveInt": {
        "input": {"required": {"value": ["INT", {"min": -9223372036854775807, "control_after_generate": True}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"], "display_name": "Int",
    },
}
