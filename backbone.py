"""The Vision Transformer backbone SMAT meta-tunes: DINO/timm parameter layout, weight I/O, pretraining.

SMAT starts from a frozen self-supervised ViT (DINO ViT-S/16, CLS feature after the final LayerNorm)
[M1.2] and meta-trains at 128 px from 224-px weights, so position embeddings are interpolated
[M1.3]. Parameter names and shapes equal DINO's / timm's, so official checkpoints load as they
are and `torch.func.functional_call` can drive the model from one flat parameter vector (smat.py).
Start at `VisionTransformer.forward`; `load_dino_weights` reads official checkpoints;
`load_shipped` reads the committed weights of the "tiny" CPU stand-in for DINO, which
`pretrain_supervised` trained once on a corpus disjoint from the embedded benchmark (standin.py).
"""

import hashlib
import json
import math
import os
import tempfile
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor, nn

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns all checks off


class BackboneError(ValueError):
    """Bad backbone input (name, weights file, checkpoint, image size); the message is one line."""


# --- § 1 Presets ---


@typechecked
@dataclass(frozen=True)
class ViTSpec:
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    grid_size: int = 14  # side of the stored position-embedding grid: 224 px / 16 = 14 for DINO
    ln_eps: float = 1e-6  # [DINO vision_transformer.py: partial(nn.LayerNorm, eps=1e-6)], as timm


PRESETS: dict[str, ViTSpec] = {
    # CPU stand-in for ViT-S/16 on 32x32 images: a 4x4 grid of 8-px patches + CLS, 0.21 M parameters.
    # 8-px patches, not 4, so that the default run fits its 10-minute CPU budget (docs/performance.md).
    "tiny": ViTSpec(patch_size=8, dim=64, depth=4, heads=4, mlp_ratio=4.0, grid_size=4),
    "vit_small_patch16": ViTSpec(16, 384, 12, 6, 4.0, 14),  # DINO ViT-S/16, 21.7 M parameters
    "vit_base_patch16": ViTSpec(16, 768, 12, 12, 4.0, 14),  # DINO ViT-B/16, 85.8 M parameters
}

# Backbone-only files: flat timm-style keys, no head [DINO README, "pretrained models"].
_DINO_ROOT = "https://dl.fbaipublicfiles.com/dino"
DINO_URLS: dict[str, str] = {
    "vit_small_patch16": f"{_DINO_ROOT}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "vit_base_patch16": f"{_DINO_ROOT}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}


# --- § 2 The network ---


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v as DINO/timm (LoRA targets "qkv")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # the fused projection holds q, k, v one after the other, each split into heads
        qkv = "batch tokens (qkv heads d) -> qkv batch heads tokens d"
        q, k, v = rearrange(self.qkv(x), qkv, qkv=3, heads=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d) v
        return self.proj(rearrange(x, "batch heads tokens d -> batch tokens (heads d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU in DINO/timm


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dim, eps=spec.ln_eps)
        self.attn = Attention(spec.dim, spec.heads)
        self.norm2 = nn.LayerNorm(spec.dim, eps=spec.ln_eps)
        self.mlp = Mlp(spec.dim, int(spec.dim * spec.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.proj = nn.Conv2d(3, spec.dim, kernel_size=spec.patch_size, stride=spec.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (batch, grid_h*grid_w, dim), row-major


@typechecked
def interpolate_pos_embed(
    pos_embed: Float[Tensor, "1 tokens dim"], grid_h: int, grid_w: int
) -> Float[Tensor, "1 new_tokens dim"]:
    """Resample the patch position embeddings to a grid_h x grid_w patch grid; the CLS entry is kept.

    Bicubic exactly as DINO's `interpolate_pos_encoding`: the scale factor is (new + 0.1) / old and is
    used as given to map coordinates, which is not quite the same as resizing to (new, new) as timm
    does (tests/test_backbone.py measures the gap) [DINO vision_transformer.py:interpolate_pos_encoding].
    """
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if (grid_h, grid_w) == (grid, grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, dim, rows, cols)
    scale = ((grid_h + 0.1) / grid, (grid_w + 0.1) / grid)  # +0.1 keeps floor(grid * scale) = new grid
    patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)


class VisionTransformer(nn.Module):
    """ViT without a classification head; returns the CLS token after the final LayerNorm [M1.2].

    Stateless in the parameters (no caches, no in-place updates), so it runs under
    `torch.func.functional_call` with parameters that are views of one flat vector.
    """

    def __init__(self, spec: ViTSpec):
        super().__init__()
        if spec.dim % spec.heads:
            raise BackboneError(f"dim {spec.dim} is not divisible by heads {spec.heads}; use a divisor")
        self.spec, self.feature_dim = spec, spec.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.grid_size**2, spec.dim))
        self.patch_embed = PatchEmbed(spec)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=spec.ln_eps)
        # timm-like init [timm vision_transformer.py:init_weights_vit_timm]; LayerNorms stay (1, 0)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def check_images(self, channels: int, height: int, width: int) -> None:
        """Refuse images this ViT cannot read (checked by every forward, and by train.py before a run starts)."""
        patch = self.spec.patch_size
        if channels != 3 or height % patch or width % patch:
            raise BackboneError(
                f"images of shape {(channels, height, width)} do not fit this ViT; "
                f"need 3 channels and height, width multiples of the patch size {patch}"
            )

    @typechecked
    def forward(self, images: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch dim"]:
        patch = self.spec.patch_size
        height, width = images.shape[-2:]
        self.check_images(*images.shape[1:])
        x = self.patch_embed(images)  # (batch, n_patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, height // patch, width // patch)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # normalise the CLS token only: the norm is per token


@typechecked
def build_backbone(name: str) -> VisionTransformer:
    """A preset ViT, randomly initialised (seed torch's global RNG first for reproducibility)."""
    if name not in PRESETS:
        raise BackboneError(f"unknown backbone {name!r}; valid: {', '.join(PRESETS)}")
    return VisionTransformer(PRESETS[name])


def _preset_name(spec: ViTSpec) -> str | None:
    return next((name for name, preset in PRESETS.items() if preset == spec), None)


# --- § 3 Weights: DINO checkpoints, our own backbone files ---


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _load_checked(model: VisionTransformer, state: dict, source: str) -> None:
    """load_state_dict(strict), but a mismatch is one line naming a few keys of each kind."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {_shape(state[k])} != {_shape(v)}" for k, v in expected.items()
             if k in state and _shape(state[k]) != _shape(v)]
    if missing or unexpected or wrong:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise BackboneError(
            f"weights in {source} do not fit the ViT {_preset_name(model.spec) or model.spec}: "
            + "; ".join(problems)
        )
    bad = [k for k in expected if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise BackboneError(f"weights in {source} hold non-finite values (NaN or infinity) in {', '.join(bad[:3])}; "
                            f"the file is damaged or its training diverged")
    model.load_state_dict(state)


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise BackboneError(f"file {path} does not exist; pass an existing file, an http(s) URL or 'dino'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickled code, not a torch file: all one answer
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BackboneError(f"cannot read {path} as tensors + plain data ({reason})") from None


@typechecked
def load_dino_weights(model: VisionTransformer, source: str) -> None:
    """Load DINO weights from 'dino' (the official URL for the model's preset), a URL or a local file.

    Accepts the backbone-only files and DINO's full training checkpoints (the "teacher" entry, as
    DINO's own evaluation does); strips "module." / "backbone." prefixes and drops projection "head.*".
    """
    if source == "dino":
        name = _preset_name(model.spec)
        if name not in DINO_URLS:
            valid = ", ".join(DINO_URLS)
            raise BackboneError(f"no DINO weights for ViT {name or model.spec}; valid: {valid}")
        source = DINO_URLS[name]
    if source.startswith(("http://", "https://")):
        try:
            checkpoint = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
        except (urllib.error.URLError, OSError) as error:
            raise BackboneError(
                f"cannot download {source} ({error}); "
                "fetch it where the network allows and pass the local file"
            ) from None
        except Exception as error:  # downloaded, but not a tensors-only torch file
            raise BackboneError(f"cannot read {source} as tensors + plain data ({error})") from None
    else:
        checkpoint = _torch_load(Path(source))
    for key in ("teacher", "student", "model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise BackboneError(f"{source} holds a {type(checkpoint).__name__}, not a state dict of tensors")
    state = {}
    for key, value in checkpoint.items():
        while key.startswith(("module.", "backbone.")):
            key = key.split(".", 1)[1]
        if not key.startswith("head."):
            state[key] = value
    _load_checked(model, state, source)


@typechecked
def save_backbone(model: VisionTransformer, path: Path, meta: dict) -> None:
    """Write weights, spec and JSON-able `meta` atomically (temporary file, then rename)."""
    try:
        json.dumps(meta)
    except TypeError as error:
        raise BackboneError(f"backbone meta must be JSON-able plain data ({error})") from None
    payload = {"spec": asdict(model.spec), "preset": _preset_name(model.spec), "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@typechecked
def load_backbone(path: Path) -> tuple[VisionTransformer, dict]:
    """Read a `save_backbone` file: (model on CPU, meta)."""
    payload = _torch_load(path)
    if not (isinstance(payload, dict) and {"spec", "meta", "state_dict"} <= payload.keys()
            and isinstance(payload["meta"], dict) and isinstance(payload["state_dict"], dict)):
        raise BackboneError(f"{path} is not a backbone file; need spec, meta, state_dict from save_backbone")
    try:
        model = VisionTransformer(ViTSpec(**payload["spec"]))
    except Exception as error:
        raise BackboneError(f"{path} has an invalid spec {payload['spec']} ({error})") from None
    _load_checked(model, payload["state_dict"], str(path))
    return model, payload["meta"]


# The committed stand-in for DINO: preset -> (file, SHA-256). Made once by `python standin.py`, which
# prints the hash to paste here; the default run loads it instead of pretraining anything.
SHIPPED_WEIGHTS: dict[str, tuple[Path, str]] = {
    "tiny": (Path(__file__).resolve().parent / "weights" / "tiny.pt",
             "62a61a7b93a5c6619712d799d1bcf94fe71763ed6fe2204e658860b3231a4ef6"),
}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_shipped(name: str) -> VisionTransformer:
    """The committed weights of preset `name`, after checking the file's SHA-256."""
    path, expected = SHIPPED_WEIGHTS[name]
    if not path.is_file():
        raise BackboneError(f"the shipped {name} weights {path} are missing; restore them with "
                            f"`git checkout -- weights/` or rebuild them with `python standin.py`")
    found = file_sha256(path)
    if found != expected:
        raise BackboneError(f"the shipped {name} weights {path} have SHA-256 {found[:12]}…, not the recorded "
                            f"{expected[:12]}…; restore them with `git checkout -- weights/`")
    return load_backbone(path)[0]


def resolve_backbone(spec: str) -> VisionTransformer:
    """The frozen θ_pre, from `--backbone`:

    - "tiny": the committed stand-in for DINO (weights/tiny.pt), pretrained once on a procedural
      corpus disjoint from every ID domain (standin.py, docs/benchmark.md);
    - "vit_small_patch16" / "vit_base_patch16": the official DINO weights (download), or
      "vit_small_patch16:PATH" for a local copy of them;
    - a path to a file written by save_backbone.
    """
    name, _, weights = spec.partition(":")
    if name in PRESETS and name.startswith("vit_"):
        model = build_backbone(name)
        load_dino_weights(model, weights or "dino")
        return model
    if name in SHIPPED_WEIGHTS and not weights:
        return load_shipped(name)
    path = Path(spec).expanduser()
    if path.exists():
        return load_backbone(path)[0]
    if name in PRESETS:  # never ignore a part of the flag
        raise BackboneError(f"backbone {spec!r}: {name} takes no :WEIGHTS part (its weights are "
                            f"shipped); use {name}, or the path of a backbone file")
    raise BackboneError(f"unknown backbone {spec!r}; use tiny, vit_small_patch16[:WEIGHTS], "
                        f"vit_base_patch16[:WEIGHTS] or a backbone file")


# --- § 4 Supervised pretraining of the tiny stand-in for DINO ---


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop after reflect-padding by 1/8 of the side, and a horizontal flip with p = 1/2."""
    batch, channels, height, width = images.shape
    pad = max(1, height // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (batch,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]  # (batch, 1, height, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]  # (batch, 1, 1, width)
    samples, planes = torch.arange(batch)[:, None, None, None], torch.arange(channels)[None, :, None, None]
    crops = padded[samples, planes, rows, cols]
    flip = (torch.rand(batch, generator=generator) < 0.5)[:, None, None, None]
    return torch.where(flip, crops.flip(-1), crops)


def _pretraining_optimizer(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, total: int):
    """AdamW with weight decay on matrices only, and its schedule: linear warm-up over the first 5% of
    the `total` steps, then cosine decay to 0."""
    decays = {n: p.ndim >= 2 and n not in ("pos_embed", "cls_token") for n, p in named}
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if decays[n]], "weight_decay": weight_decay},
         {"params": [p for n, p in named if not decays[n]], "weight_decay": 0.0}], lr=lr
    )
    warmup = max(1, round(0.05 * total))

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine from 1 to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


@typechecked
def pretrain_supervised(
    model: VisionTransformer,
    images: Float[Tensor, "n channels height width"],
    labels: Int[Tensor, " n"],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """Train `model` with a temporary linear head on the CLS feature; the head is discarded after.

    AdamW, linear warm-up over the first 5% of steps then cosine decay to 0, label smoothing 0.1,
    weight decay on matrices only (not norms, biases, pos_embed, cls_token), as timm/DeiT recipes do.
    Returns per-epoch {"epoch", "loss", "accuracy"} on the augmented training batches; the model is left
    on `device`, in train mode (it has no dropout, so the mode does not change its output).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0 or labels.min() < 0:
        raise BackboneError(
            f"need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0, labels >= 0; got {epochs}, "
            f"{batch_size}, {lr}, {weight_decay}, min label {labels.min().item()}"
        )
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    head = nn.Linear(model.feature_dim, int(labels.max()) + 1).to(device)
    nn.init.zeros_(head.weight)  # start from the uniform prediction
    nn.init.zeros_(head.bias)
    total = epochs * math.ceil(len(labels) / batch_size)
    optimizer, schedule = _pretraining_optimizer([*model.named_parameters(), *head.named_parameters(prefix="head")],
                                                 lr, weight_decay, total)
    history, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            batch_images = _augment(images[index], generator).to(device)
            batch_labels = labels[index].to(device)
            logits = head(model(batch_images))
            loss = F.cross_entropy(logits, batch_labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.item() * len(index)  # CPU-GPU sync point, once per step
            correct += (logits.argmax(1) == batch_labels).sum().item()
            if progress is not None:
                progress(step, total, {"epoch": epoch, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        history.append({"epoch": epoch, "loss": loss_sum / len(labels), "accuracy": correct / len(labels)})
    return history
