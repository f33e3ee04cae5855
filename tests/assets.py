"""Test data the end-to-end tests share: two small image-folder domains and a random ViT file."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import backbone as backbones


def make_assets(base: Path) -> Path:
    """Two image-folder domains, `alpha` (ID) and `beta` (OOD), of 30 classes × 20 images of 16 px
    (enough for the default 5-way 5-shot 15-query test episodes; a class is a colour plus noise), and
    a 1-block random ViT saved as `vit.pt`. The same bytes on every call."""
    rng = np.random.default_rng(0)
    for domain in ("alpha", "beta"):
        for c in range(30):
            folder = base / domain / f"class{c}"
            folder.mkdir(parents=True)
            colour = rng.integers(0, 256, 3)
            for i in range(20):
                image = np.clip(colour + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    torch.manual_seed(0)
    vit = backbones.VisionTransformer(backbones.ViTSpec(patch_size=8, dim=16, depth=1, heads=2, grid_size=2))
    backbones.save_backbone(vit, base / "vit.pt", {"note": "random test backbone"})
    return base
