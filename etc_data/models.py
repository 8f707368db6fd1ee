"""Model factory (timm): ConvMixer with any dim/depth/kernel/patch, and ViT.

A model is described by a small JSON-able config stored in every checkpoint, e.g.
``{"arch": "convmixer", "dim": 256, "depth": 8, "kernel": 9, "patch": 1, "num_classes": 10, "img_size": 32}``
or ``{"arch": "vit", "variant": "vit_base_patch16_224", "patch": 16, "img_size": 224, "num_classes": 10,
"pretrained_file": null}`` (``variant`` may also be ``custom`` with ``dim``/``depth``/``heads``).
``convmixer_config`` and ``vit_config`` build the architecture part; the trainer adds
``num_classes`` and ``img_size`` from the manifest. Pretrained weights only ever come from a local
file: nothing can be downloaded.
"""

from __future__ import annotations

from .errors import EtcError

VIT_VARIANTS = {
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
}


DEFAULT_VIT_VARIANT = "vit_base_patch16_224"


class ModelError(EtcError):
    pass


def convmixer_config(dim: int = 256, depth: int = 8, kernel: int = 9, patch: int = 1) -> dict:
    """ConvMixer-dim/depth (the paper's CIFAR-10 model is the default: 256/8, kernel 9, patch 1)."""
    return {"arch": "convmixer", "dim": dim, "depth": depth, "kernel": kernel, "patch": patch}


def vit_config(variant: str = DEFAULT_VIT_VARIANT, dim: int = 192, depth: int = 6, heads: int = 4, patch: int = 16,
               pretrained_file: str | None = None) -> dict:
    """A named timm ViT variant, or ``custom`` with ``dim``/``depth``/``heads``/``patch``."""
    return {"arch": "vit", "variant": variant, "dim": dim, "depth": depth, "heads": heads, "patch": patch,
            "pretrained_file": pretrained_file}


def create_model(config: dict):
    """Build the timm model a config describes (weights random unless ``pretrained_file``)."""
    import torch

    arch = config.get("arch")
    if arch == "convmixer":
        from timm.models.convmixer import ConvMixer

        try:
            m = ConvMixer(dim=int(config["dim"]), depth=int(config["depth"]), kernel_size=int(config["kernel"]),
                          patch_size=int(config["patch"]), num_classes=int(config["num_classes"]))
        except KeyError as e:
            raise ModelError(f"model config lacks field {e}") from None
    elif arch == "vit":
        from timm.models.vision_transformer import VisionTransformer

        variant = config.get("variant", DEFAULT_VIT_VARIANT)
        if variant == "custom":
            kw = dict(embed_dim=int(config["dim"]), depth=int(config["depth"]), num_heads=int(config["heads"]),
                      patch_size=int(config["patch"]))
        elif variant in VIT_VARIANTS:
            kw = dict(VIT_VARIANTS[variant])
        else:
            raise ModelError(f"unknown ViT variant {variant!r}; valid: custom, {', '.join(VIT_VARIANTS)}")
        m = VisionTransformer(img_size=int(config.get("img_size", 224)), num_classes=int(config["num_classes"]), **kw)
        pf = config.get("pretrained_file")
        if pf:
            try:
                sd = torch.load(pf, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError) as e:
                raise ModelError(f"cannot read pretrained weights {pf}: {e}") from None
            sd = sd.get("model", sd) if isinstance(sd, dict) else sd
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # new classifier for our classes
            missing, unexpected = m.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if not k.startswith("head.")]:
                raise ModelError(f"pretrained weights {pf} do not fit {variant}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    else:
        raise ModelError(f"unknown model arch {arch!r}; valid: convmixer, vit")
    return m


def patch_size(config: dict) -> int:
    if config.get("arch") == "vit" and config.get("variant", DEFAULT_VIT_VARIANT) in VIT_VARIANTS:
        return VIT_VARIANTS[config["variant"]]["patch_size"]
    return int(config["patch"])
