"""Input stems per data owner over one shared body: one model from several owners' encrypted data.

Each owner encrypts under their own key, so the first layer that sees pixels is the only one that
must differ between owners. ``OwnerStems`` wraps a timm model: its stem (``STEM_PARTS``) is taken
out and copied once per owner, everything after it (the body and the head) is shared:

- ConvMixer: ``stem`` (the patch-embedding conv, its activation and BatchNorm);
- ViT: ``patch_embed`` and ``pos_embed`` (a scrambled block order moves every position; the class
  token stays shared).

``forward(xs)`` takes a list with one (possibly empty) batch per owner and runs each through its
owner's stem, then the concatenation through the body; ``forward(x, owner=k)`` runs one owner's
batch. Every stem takes part in every mixed forward, so DDP needs no ``find_unused_parameters``.
``owner_state_dict(k)`` is an ordinary timm state dict (owner k's stem plus the body): the
single-owner checkpoint that ``etc-data evaluate`` runs on that owner's shards. With
``stem_of_owner`` all zeros the owners share one stem (the baseline that ignores that keys differ).

Why it can work: for a common-key scheme (``blockwise``, block size = patch size) owner B's images
are owner A's with a fixed permutation and sign change inside every patch, so B's stem can be A's
stem with its input weights permuted and negated: per-owner stems lose nothing against training on
the plain union. EtC (a key per block, with block scrambling) has no such exact stem.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import EtcError

STEM_PARTS = {"convmixer": ("stem",), "vit": ("patch_embed", "pos_embed")}
JOINT_PREFIXES = ("stems",)  # the stems of an OwnerStems model (its body's names start with "body.")


class StemError(EtcError):
    pass


def stem_parts(arch: str) -> tuple[str, ...]:
    if arch not in STEM_PARTS:
        raise StemError(f"no per-owner stem is defined for model arch {arch!r}; valid: {', '.join(STEM_PARTS)}")
    return STEM_PARTS[arch]


def is_stem(name: str, arch: str) -> bool:
    """Whether a parameter or state-dict entry (by name) belongs to an input stem."""
    return name.split(".")[0] in stem_parts(arch) + JOINT_PREFIXES


def _check_vit(model) -> None:
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class or model.dynamic_img_size:
        raise StemError("per-owner ViT stems need a class token, no register tokens, position embeddings over the "
                        "class token and a fixed image size (what etc_data.models.create_model builds)")


class OwnerStems(nn.Module):
    def __init__(self, model: nn.Module, arch: str, stem_of_owner: list[int]):
        super().__init__()
        parts = stem_parts(arch)
        if arch == "vit":
            _check_vit(model)
        self.arch, self.stem_of_owner = arch, list(stem_of_owner)
        self.stems = nn.ModuleList()
        for _ in range(max(self.stem_of_owner) + 1):
            stem = nn.Module()
            for p in parts:
                setattr(stem, p, copy.deepcopy(getattr(model, p)))
            self.stems.append(stem)
        for p in parts:
            delattr(model, p)
        self.body = model

    def embed(self, x, owner: int):
        s = self.stems[self.stem_of_owner[owner]]
        if self.arch == "convmixer":
            return s.stem(x)
        tokens = s.patch_embed(x)
        return torch.cat([self.body.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + s.pos_embed

    def head(self, h):
        b = self.body
        if self.arch == "convmixer":
            return b.forward_head(b.blocks(h))
        return b.forward_head(b.norm(b.blocks(b.norm_pre(b.patch_drop(b.pos_drop(h))))))

    def forward(self, x, owner: int | None = None):
        """``x``: one owner's batch (``owner=k``), or a list of batches, one per owner."""
        h = self.embed(x, owner) if owner is not None else torch.cat([self.embed(xk, k) for k, xk in enumerate(x)])
        return self.head(h)

    def owner_state_dict(self, owner: int) -> dict:
        """Owner ``owner``'s model as an ordinary timm state dict: its stem plus the shared body."""
        sd = dict(self.body.state_dict())
        sd.update(self.stems[self.stem_of_owner[owner]].state_dict())
        return sd


class OwnerView(nn.Module):
    """One owner's model inside a (possibly DDP-wrapped) ``OwnerStems``: ``view(x) = model(x, owner=k)``."""

    def __init__(self, model: nn.Module, owner: int):
        super().__init__()
        self.model, self.owner = model, owner

    def forward(self, x):
        return self.model(x, owner=self.owner)


def load_body(model: nn.Module, state: dict, arch: str, where: str) -> None:
    """Load every entry of a single-owner state dict into a timm model but its stem (a new owner's
    stem starts fresh: it was made for another key)."""
    body = {k: v for k, v in state.items() if not is_stem(k, arch)}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as e:
        raise StemError(f"{where} does not fit this model: {e}") from None
    missing = [k for k in missing if not is_stem(k, arch)]
    if missing or unexpected:
        raise StemError(f"{where} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def train_only_stems(model: nn.Module, arch: str) -> None:
    """Only the stems train: every other parameter stops taking gradients (``--freeze-body``)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_stem(name, arch))


def keep_body_frozen(model: nn.Module, arch: str) -> None:
    """After ``model.train()``: the body back in eval mode, so that its BatchNorm statistics do not
    move either (``--freeze-body``)."""
    for name, child in model.named_children():
        if not is_stem(name, arch):
            child.eval()
