"""Fine-tuning on the support set before predicting the queries [M5.2; official md_few_shot].

The meta-tested model's θ_i (router, test gates) is the start; `finetune_logits` then takes a few AdamW
steps on the augmented support set, over all of θ ("full") or over LoRA factors on the attention's
query and value projections ("lora"), and predicts the queries with the fine-tuned prototypes.
evaluate.py calls it per episode and chooses its learning rate on validation episodes.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor, nn
from torch.func import functional_call

import smat
from smat import SMAT

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns every check off

FINETUNE_STEPS = 50  # [official: md_few_shot hps search, 50 steps]
LORA_RANK, LORA_ALPHA, LORA_LR_FACTOR = 8, 32, 10  # [official: peft LoraConfig r=8, alpha=32; lr ×10]
FINETUNE_WEIGHT_DECAY = 0.01  # torch's AdamW default, as the official code


class FinetuneError(ValueError):
    """A model that cannot be fine-tuned as asked (LoRA without attention weights); one line."""


@typechecked
def augment(images: Float[Tensor, "batch channels height width"],
            generator: torch.Generator) -> Float[Tensor, "batch channels height width"]:
    """Support-set augmentation of the official fine-tuning [DiffAugment color + translation, p = 0.9,
    then a 50% horizontal flip]: brightness, saturation, contrast, a shift of up to 1/8 of the side."""
    n, size = len(images), images.shape[-1]

    def draw() -> Tensor:
        return torch.rand(n, 1, 1, 1, generator=generator, device=images.device)

    x = images + (draw() - 0.5)  # brightness
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (2 * draw()) + mean  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (draw() + 0.5) + mean  # contrast
    shift = (torch.rand(n, 2, generator=generator, device=images.device) * 2 - 1) * (size // 8)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift.round() * 2 / size  # whole pixels, zero padding
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x = torch.where(draw() < 0.9, x, images)
    return torch.where(draw() < 0.5, x.flip(-1), x)


class FlatLoRA(nn.Module):
    """Rank-r updates of the query and value projections of every attention block, applied to the
    named views of a flat θ: W_qkv + (α/r)·[B_q A_q; 0; B_v A_v] [official: peft LoRA on "query",
    "value"; Hu et al. 2022]. B starts at zero, so the model starts at θ exactly."""

    def __init__(self, layout: smat.ParamLayout, generator: torch.Generator, rank: int = LORA_RANK,
                 alpha: float = LORA_ALPHA) -> None:
        super().__init__()
        self.targets = [name for name in layout.names if name.endswith("attn.qkv.weight")]
        if not self.targets:
            raise FinetuneError("LoRA needs attention weights named blocks.N.attn.qkv.weight; "
                                "this backbone has none")
        dim = layout.shapes[layout.names.index(self.targets[0])][1]
        self.scale = alpha / rank
        bound = dim**-0.5  # peft's kaiming_uniform(a=√5) on A gives U(±1/√fan_in)
        # a: (blocks, q|v, rank, dim); b: (blocks, q|v, dim, rank)
        uniform = torch.rand(len(self.targets), 2, rank, dim, generator=generator) * 2 - 1
        self.a = nn.Parameter(uniform * bound)
        self.b = nn.Parameter(torch.zeros(len(self.targets), 2, dim, rank))

    def forward(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        update = self.scale * (self.b @ self.a)  # blocks × 2 × dim × dim
        keys = torch.zeros_like(update[:, 0])
        update = torch.cat([update[:, 0], keys, update[:, 1]], dim=1)  # blocks × 3·dim × dim
        return params | {name: params[name] + update[i] for i, name in enumerate(self.targets)}


@typechecked
def finetune_logits(
    model: SMAT,
    support_images: Float[Tensor, "n_support channels height width"],
    support_labels: Int[Tensor, " n_support"],
    query_images: Float[Tensor, "n_query channels height width"],
    n_way: int,
    mode: Literal["full", "lora"],
    lr: float,
    steps: int = FINETUNE_STEPS,
    seed: int = 0,
    pretrained: bool = False,
    gates: Tensor | None = None,
) -> tuple[Float[Tensor, "n_query n_way"], Float[Tensor, " n_experts"]]:
    """Fine-tune θ_i on the support set, then predict the queries [M5.2; official md_few_shot].

    θ_i (detached) is the start. Each step: prototypes from the un-augmented support (with gradient),
    10·cos logits of the augmented support, cross-entropy, one AdamW step on θ (full) or on the LoRA
    factors (lora, lr ×10). Returns the query logits after the last step and the router weights.
    """
    cfg, n_support = model.cfg, len(support_labels)
    theta, weights = smat.task_model(model, support_images, support_labels, n_way, pretrained, gates)
    generator = torch.Generator(device=support_images.device).manual_seed(seed)
    if mode == "full":
        theta = theta.clone().requires_grad_()
        trained, step_lr = [theta], lr

        def params() -> dict[str, Tensor]:
            return model.layout.unflatten(theta)
    else:
        lora = FlatLoRA(model.layout, torch.Generator().manual_seed(seed)).to(theta.device)
        trained, step_lr = list(lora.parameters()), lr * LORA_LR_FACTOR

        def params() -> dict[str, Tensor]:
            return lora(model.layout.unflatten(theta))
    optimizer = torch.optim.AdamW(trained, lr=step_lr, weight_decay=FINETUNE_WEIGHT_DECAY)
    with torch.enable_grad():
        for _ in range(steps):
            images = torch.cat([support_images, augment(support_images, generator)])
            features = functional_call(model.architecture, params(), (images,))  # one forward for both
            prototypes = smat.class_prototypes(features[:n_support], support_labels, n_way)
            logits = smat.cosine_logits(features[n_support:], prototypes, cfg.cosine_scale)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, support_labels).backward()
            optimizer.step()
    with torch.no_grad():
        features = functional_call(model.architecture, params(), (torch.cat([support_images, query_images]),))
        prototypes = smat.class_prototypes(features[:n_support], support_labels, n_way)
        return smat.cosine_logits(features[n_support:], prototypes, cfg.cosine_scale), weights
