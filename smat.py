"""SMAT — Sparse MetA-Tuning, the method in one file, in the paper's order.

SMAT meta-tunes a frozen pre-trained vision transformer for few-shot classification. A pool of
sparse "interpolated experts" — one shared dense update δ and one hard-concrete mask z_m per
expert — is mixed per task by a router that reads the support set, and interpolated with the frozen
weights: θ_i = θ_pre + (Σ_m w_m z_m) ⊙ δ. Training distils a dense one-step teacher into the sparse
student and holds every expert at a target sparsity τ with a Lagrangian constraint.

Paper: Chen, Tack, Yang, Teh, Schwarz, Wei. "Unleashing the Power of Meta-tuning for Few-shot
Generalization Through Sparse Interpolated Experts". ICML 2024, arXiv 2403.08477 (v1). The paper's
equation numbers are not available to us: `[M3.9]`-style tags are this project's own numbering of the
method's parts, rows of docs/method.md's table (M3.9: the sparsity constraint), never the paper's
section numbers; `[official: ...]` tags cite the official code at commit 302a914
(`[official: SIE Lnnn]`, SIE = src/learners/meta_learners/sparse_interpolated_experts.py). Choices that differ from either are
marked `NOTE:` and listed in docs/deviations.md.

Reading guide: start at `meta_train_step` (§7), one screen that reads like the algorithm; §2-§6 are
its parts; §8 is the meta-update: `meta_update` reduces a meta-batch of tasks (across processes too)
and steps `MetaOptimizer` (optimisers, clipping, dual ascent on the multipliers).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor, nn
from torch.func import functional_call

import fused_merge

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns every check off

# Shape glossary (jaxtyping axis names used below)
#   n_params   P, every scalar of the backbone, flattened          (ViT-S/16: 21.67 M)
#   n_experts  M, experts in the pool                               (8)
#   n_support  support images of one episode; n_query query images
#   n_way      classes of the episode; dim  feature width of the backbone (ViT-S: 384)


# --- § 1 Configuration ----------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration value is out of range; the message is one line naming it and what is valid."""


MAX_EXPERTS = 1024  # an expert pool of M experts holds M masks of the whole backbone
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit at most here

# The choices of Config's named options, as types: train.py's command line offers exactly these.
Method = Literal["smat", "pmf"]
MaskSampling = Literal["stochastic", "official"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ConstraintGates = Literal["test", "sampled"]


@dataclass(frozen=True)
class Config:
    """Every hyper-parameter of a run, with its default; written beside every checkpoint.

    The defaults are the CPU profile (embedded benchmark, tiny ViT). `Config.paper()` gives the
    paper's ViT-S/16 DINO Meta-Dataset settings [M3.11, official configs/md_smat_vits_dino.yaml].
    """

    # method [M3]
    method: Method = "smat"  # pmf = dense ProtoNet meta-tuning, the same code with parts off
    n_experts: int = 8  # |M|, size of the expert pool [official: sparsity.num_experts]
    sparsity: float = 0.9  # τ, target fraction of zeros in every expert's mask [M3.9]
    mask_init_std: float = 0.5  # log α ~ N(0, 0.5²) [official: SIE L127-128]
    log_alpha_bound: float = math.log(100.0)  # log α clamped to ±4.605 [official: SIE L352-354]
    mask_sampling: MaskSampling = "stochastic"  # §2; official = noise-free, β=1 at test
    # NOTE: which gates the constraint ŝ_m ≥ τ counts: "test" = the deterministic gates the evaluated
    # model uses (default), "sampled" = the training sample, as the paper and the official code.
    constraint_gates: ConstraintGates = "test"
    router_tokens: int = 4  # learnable "skill" tokens appended to the prototypes [official: SIE L97]
    router_heads: int = 4  # heads of the router's attention block [official: SIE L98-100]
    router_mlp_ratio: float = 2.0
    router_spectral_norm: bool = True  # spectral norm on the router's linear layers [official: SIE L73]
    router_temperature_start: float = 5.0  # T_r = max(0.5, 5 - n/4000) [official: SIE L473]
    router_temperature_end: float = 0.5
    # fraction of the run's tasks until T_r reaches its end value: 400 of the CPU profile's 800 tasks;
    # the official code anneals over 18k of 50k (0.36). A fraction, so a short run still shows routing.
    router_anneal_fraction: float = 0.5
    # top-k routing (a variant, docs/extending.md): only the K highest-scoring experts of a task merge;
    # 0 = all of them, the paper's soft merge
    router_top_k: int = 0
    router_logit_penalty: float = 1e-4  # 1e-4·mean(a²) "for stabilised training" [official: SIE L686]
    cosine_scale: float = 10.0  # logits = 10·cos(f, W_c) [official: common.py sim_func]
    inner_step: bool = True  # one first-order GD step on the support set, training only [M3.6]
    # NOTE: the CPU profile's inner and teacher lrs are 4× the official (1e-3, 5e-3, in `paper()`):
    # chosen with δ lr on ID validation classes (benchmarks/select_lr.sh), so the teacher leads.
    inner_lr: float = 4e-3
    teacher: bool = True  # dense teacher, distilled into the student [M3.8]
    teacher_steps: int = 1  # K; the official code hard-codes 1 [official: SIE L657]
    teacher_lr: float = 2e-2
    distill_temperature: float = 2.0  # T
    distill_weight: float = 0.25  # κ: loss = (1-κ)·CE + κ·KD, plain CE without KD terms [official: SIE L708]
    distill_direction: Literal["reverse", "forward"] = "reverse"  # official: KL(student‖teacher)
    kl_to_pretrained: bool = True  # extra KD term to the frozen model's ProtoNet [official: SIE L668-685]

    # meta-update [M3.11]
    meta_batch: int = 4  # tasks per optimiser step
    episodes: int = 800  # meta-training episodes (tasks); official 50k
    # NOTE: the CPU profile's learning rates (δ, λ, router) are larger than the official ones (in
    # `paper()`): 200 optimiser steps instead of 12.5k. δ's (and PMF's, PMF_CPU_LRS) chosen on ID
    # validation classes over a grid, 2 seeds (benchmarks/select_lr.sh, docs/results.md).
    delta_lr: float = 0.2
    delta_momentum: float = 0.9
    delta_weight_decay: float = 1e-4  # decays θ_i towards θ_pre, since θ_i - θ_pre ∝ δ
    mask_lr: float = 1e6  # huge on purpose: sign-like jumps push log α to its bounds [official: yaml]
    mask_clip: float = 5.0  # global grad-norm clip on log α [official: max_grad_norm]
    # η_λ, the dual ascent step, constant over the run: NOTE the official scheduler also anneals it
    multiplier_lr: float = 0.1  # official 2e-3 [official: outer_lr.lagrangian_lr]
    router_lr: float = 1e-3  # AdamW; official 1e-4 [official: trainer L121]
    router_weight_decay: float = 1e-2
    router_clip: float = 1.0
    warmup_fraction: float = 0.1  # linear warm-up, then cosine (official: 5 of 50 epochs)
    # the same θ_i with a hand-derived backward that keeps less for it (fused_merge.py): GPU memory at
    # ViT-S scale, so on in the paper profile only; off, training runs merge_masks + interpolate
    fused_merge: bool = False

    # data, backbone and protocol (read by train.py / evaluate.py, never by §2-§8)
    data: str = "embedded"
    backbone: str = "tiny"
    image_size: int = 32
    train_protocol: Literal["fixed", "variable"] = "fixed"
    train_ways: int = 5
    train_shots: int = 5
    train_queries: int = 10
    test_protocol: Literal["fixed", "variable"] = "fixed"
    test_ways: int = 5
    test_shots: int = 5
    test_queries: int = 15
    val_every: int = 500  # episodes between validations (best-on-validation model kept)
    checkpoint_every: int = 100  # episodes between resumable checkpoints
    val_episodes: int = 60  # per ID domain
    test_episodes: int = 600  # per domain [official: nTestEpisode]
    seed: int = 0
    precision: Precision = "auto"  # GPU autocast: auto = bf16 where native, else fp16; CPU runs in fp32

    def __post_init__(self) -> None:
        for f in fields(self):  # every float finite: a NaN or infinite lr would train on nonsense
            value = getattr(self, f.name)
            if f.type is float and isinstance(value, (int, float)) and not math.isfinite(value):
                raise ConfigError(f"{f.name} = {value} is not valid; it must be a finite number")
        batch = max(1, self.meta_batch)
        below = max(batch, self.episodes // batch * batch)
        checks = [  # (holds, name, value, what would be valid)
            (0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "a number in [0, 1)"),
            (1 <= self.n_experts <= MAX_EXPERTS, "experts", self.n_experts, f"an integer in [1, {MAX_EXPERTS}]"),
            (self.method != "pmf" or self.n_experts == 1, "experts", self.n_experts, "1 for method pmf"),
            (self.episodes >= 1, "episodes", self.episodes, "an integer >= 1"),
            (self.meta_batch >= 1, "meta_batch", self.meta_batch, "an integer >= 1"),
            (self.episodes % batch == 0, "episodes", self.episodes,
             f"a multiple of meta_batch {batch}, such as {below} or {below + batch}"),
            (0 <= self.seed <= MAX_SEED, "seed", self.seed, f"an integer in [0, {MAX_SEED}]"),
            (self.teacher_steps >= 1, "teacher_steps", self.teacher_steps, "an integer >= 1"),
            (self.router_tokens >= 1, "router_tokens", self.router_tokens, "an integer >= 1"),
            (0 <= self.router_top_k <= self.n_experts, "router_top_k", self.router_top_k,
             f"an integer in [0, {self.n_experts}] (the number of experts; 0 = all)"),
            (self.image_size >= 8, "image_size", self.image_size, "an integer >= 8"),
            (0.0 <= self.distill_weight <= 1.0, "distill_weight", self.distill_weight, "a number in [0, 1]"),
            (self.distill_temperature > 0, "distill_temperature", self.distill_temperature, "a number > 0"),
            (0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", self.warmup_fraction, "a number in [0, 1)"),
            (0.0 < self.router_anneal_fraction <= 1.0, "router_anneal_fraction", self.router_anneal_fraction,
             "a number in (0, 1]"),
            (min(self.train_ways, self.test_ways) >= 2, "ways", min(self.train_ways, self.test_ways), ">= 2"),
            (min(self.train_shots, self.test_shots) >= 1, "shots", min(self.train_shots, self.test_shots), ">= 1"),
            (min(self.train_queries, self.test_queries) >= 1, "queries", min(self.train_queries, self.test_queries), ">= 1"),
            (self.val_episodes >= 2, "val_episodes", self.val_episodes, "an integer >= 2"),
            (self.test_episodes >= 2, "test_episodes", self.test_episodes, "an integer >= 2"),
            (self.val_every >= 1 and self.checkpoint_every >= 1, "val_every/checkpoint_every",
             min(self.val_every, self.checkpoint_every), "an integer >= 1"),
        ]
        for holds, name, value, valid in checks:
            if not holds:
                raise ConfigError(f"{name} = {value} is out of range; it must be {valid}")
        for f in fields(self):  # a Literal field holds one of its values
            value, choices = getattr(self, f.name), get_args(f.type)
            if get_origin(f.type) is Literal and value not in choices:
                raise ConfigError(f"{f.name} = {value!r} is not valid; use one of {', '.join(choices)}")
        reachable = max_sparsity(self)
        if self.has_constraint and self.sparsity > reachable:
            raise ConfigError(
                f"sparsity = {self.sparsity} cannot be reached with mask_sampling {self.mask_sampling} and "
                f"constraint_gates {self.constraint_gates} (at most {reachable:.4f} with log α ≥ "
                f"-{self.log_alpha_bound:.3f}); use a sparsity <= {math.floor(reachable * 1e4) / 1e4}")

    # What the method is made of: SMAT has all of these, PMF none. The teacher is a switch of its own
    # (`teacher`, off in PMF_SWITCHES). A variant changes the one it needs; every part of the code asks
    # the one it is about.
    @property
    def has_router(self) -> bool:
        """Merging weights w from a router on the support set (else w = (1): one dense expert)."""
        return self.method == "smat"

    @property
    def has_masks(self) -> bool:
        """Hard-concrete masks z_m, log α (else θ_i = θ_pre + δ, dense)."""
        return self.method == "smat"

    @property
    def has_constraint(self) -> bool:
        """The Lagrangian sparsity constraint ŝ_m ≥ τ on the masks, with its multipliers λ."""
        return self.has_masks

    @classmethod
    def pmf(cls, **overrides) -> "Config":
        """Dense ProtoNet meta-tuning (P>M>F, Hu et al. CVPR 2022): one dense expert, prototypes, CE."""
        return cls(**{**PMF_SWITCHES, **PMF_CPU_LRS, **overrides})

    @classmethod
    def paper(cls, **overrides) -> "Config":
        """The paper's ViT-S/16 DINO Meta-Dataset profile [M1.3-1.5, M3.11]: 50k tasks, 128 px."""
        sources = ("ilsvrc_2012", "aircraft", "cu_birds", "quickdraw", "dtd", "fungi", "vgg_flower", "omniglot")
        paper = dict(
            backbone="vit_small_patch16", image_size=128, train_protocol="variable", test_protocol="variable",
            data=",".join([f"h5:metadataset_h5/{s}@id" for s in sources]
                          + [f"h5:metadataset_h5/{s}@ood" for s in ("traffic_sign", "mscoco")]),
            episodes=50_000, val_every=2_000, val_episodes=120, checkpoint_every=500, warmup_fraction=0.1,
            delta_lr=1e-4, multiplier_lr=2e-3, router_lr=1e-4, router_anneal_fraction=0.36,
            inner_lr=1e-3, teacher_lr=5e-3, fused_merge=True,
        )
        return cls(**{**paper, **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# PMF is SMAT with these parts switched off: one dense expert, no masks or router, no inner step, no
# teacher, no sparsity constraint.
PMF_SWITCHES = dict(method="pmf", n_experts=1, teacher=False, kl_to_pretrained=False, inner_step=False)
# PMF's own δ lr in the CPU profile, chosen on ID validation classes as SMAT's was (benchmarks/select_lr.sh,
# docs/results.md); the paper profile keeps the official 1e-4 for both methods.
PMF_CPU_LRS = dict(delta_lr=0.02)


# --- § 2 Hard-concrete gates [Louizos, Welling & Kingma, ICLR 2018, §4] -------------------------

# Louizos+18's stretched hard-concrete distribution; the official code uses the same constants
# [official: SIE L81-84].
BETA = 2.0 / 3.0  # temperature of the concrete (relaxed Bernoulli) sample
GAMMA = -0.1  # stretch interval (γ, ζ) = (-0.1, 1.1): the sample can land beyond [0, 1] ...
ZETA = 1.1  # ... and is then clamped, so exact zeros and exact ones have non-zero probability
EPSILON = 1e-6  # keeps u away from 0 and 1 so log u and log(1-u) stay finite


def _stretch_and_clamp(s: Tensor) -> Tensor:
    # z = min(1, max(0, s·(ζ-γ) + γ))
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


@typechecked
def sample_gates(
    log_alpha: Float[Tensor, "n_experts n_params"], generator: torch.Generator | None = None
) -> Float[Tensor, "n_experts n_params"]:
    """A stochastic hard-concrete sample, the training-time gate of Louizos+18.

    u ~ U(0, 1), s = σ((log u - log(1-u) + log α) / β), z = clamp(s·(ζ-γ) + γ, 0, 1). The
    reparameterised noise lets gradients reach log α while z still contains exact zeros.
    """
    return _stretch_and_clamp(torch.sigmoid((_logistic_noise(log_alpha, generator) + log_alpha) / BETA))


def _logistic_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    # log u - log(1-u), u ~ U(ε, 1-ε), built in place: at most two M×P tensors alive, not four
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    u.clamp_(EPSILON, 1.0 - EPSILON)
    return torch.log(u).sub_(u.neg_().log1p_())


@typechecked
def official_train_gates(log_alpha: Float[Tensor, "n_experts n_params"]) -> Float[Tensor, "n_experts n_params"]:
    """The official code's training gate: u ≈ 0.5 makes the noise vanish, so z is deterministic.

    NOTE: [official: SIE L226] draws u from U(0.5 - 1e-6, 0.5 + 1e-6); we drop the ±1e-6 (it changes
    log u - log(1-u) by < 4e-6). Selected with Config.mask_sampling = "official".
    """
    return _stretch_and_clamp(torch.sigmoid(log_alpha / BETA))


@typechecked
def eval_gates(log_alpha: Float[Tensor, "n_experts n_params"]) -> Float[Tensor, "n_experts n_params"]:
    """The deterministic test-time gate, z = clamp(σ(log α)·(ζ-γ) + γ, 0, 1).

    Louizos+18's test-time estimator (β = 1), which the official code uses at evaluation too
    [official: SIE L229-232]. NOTE: with mask_sampling = "official" training used β = 2/3 without
    noise, so train and test gates differ there (e.g. log α = 1.6: 1.0 in training, 0.898 at test).
    """
    return _stretch_and_clamp(torch.sigmoid(log_alpha))


@typechecked
def expected_density(log_alpha: Float[Tensor, "n_experts n_params"]) -> Float[Tensor, " n_experts"]:
    """Expected L0 norm per expert, as a fraction of P: mean_j P(z_j ≠ 0) [Louizos+18 §4].

    P(z > 0) = 1 - Q(s ≤ 0) = σ(log α - β·log(-γ/ζ)) = σ(log α + 1.5986). It is differentiable in
    log α, unlike the hard count, so it carries the primal sparsity gradient [official: SIE L245-259].
    """
    return _ExpectedDensity.apply(log_alpha)


class _ExpectedDensity(torch.autograd.Function):
    """mean_j σ(log α + 1.5986), whose backward recomputes σ: autograd would keep it, M×P, for backward
    (0.7 GB for ViT-S, 8 experts) and add two M×P temporaries; here one M×P temporary, in place.
    Oracle: tests/test_fast_path.py."""

    OFFSET = -BETA * math.log(-GAMMA / ZETA)  # 1.5986

    @staticmethod
    def forward(ctx, log_alpha):
        ctx.save_for_backward(log_alpha)
        return torch.sigmoid(log_alpha + _ExpectedDensity.OFFSET).mean(dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (log_alpha,) = ctx.saved_tensors
        s = torch.add(log_alpha, _ExpectedDensity.OFFSET).sigmoid_()
        return s.addcmul_(s, s, value=-1).mul_(grad[:, None] / log_alpha.shape[-1])  # σ' = σ(1-σ), over P


def eval_sparsity(log_alpha: Tensor) -> Tensor:
    """ŝ_m of the deterministic test gates, without building them: eval_gates(log α) = 0 exactly
    where σ(log α)·(ζ-γ) + γ ≤ 0, i.e. log α ≤ log(-γ/ζ) = -2.398. (n_experts, n_params) -> n_experts."""
    return (log_alpha <= math.log(-GAMMA / ZETA)).sum(dim=-1) / log_alpha.shape[-1]


def max_sparsity(cfg: "Config") -> float:
    """The largest ŝ the constraint can count, with every log α at its lower bound -B.

    Test gates and the official noise-free training gates are exactly 0 below a threshold of log α
    (-2.398 and β·log(-γ/ζ) = -1.599), so any τ < 1 is reachable when -B is below it. A stochastic
    sample is 0 with probability 1 - σ(log α + 1.5986) < 1, so counted on samples ŝ ≤ σ(B - 1.5986),
    0.9529 for B = log 100.
    """
    bound = cfg.log_alpha_bound
    if cfg.constraint_gates == "test":
        return 1.0 if -bound <= math.log(-GAMMA / ZETA) else 0.0
    if cfg.mask_sampling == "official":
        return 1.0 if -bound <= BETA * math.log(-GAMMA / ZETA) else 0.0
    return 1.0 / (1.0 + math.exp(-(bound - _ExpectedDensity.OFFSET)))


@typechecked
def hard_sparsity(gates: Float[Tensor, "n_experts n_params"]) -> Float[Tensor, " n_experts"]:
    """ŝ_m = #(z_m = 0) / P, the quantity the constraint ŝ_m ≥ τ is about [M3.9]."""
    return (gates == 0).sum(dim=-1) / gates.shape[-1]  # an exact count: no M×P float copy, no fp32 rounding


# --- § 3 Sparse interpolated experts [M3.1, M3.3] --------------------------------------------


class ParamLayout:
    """Where each backbone tensor lives in the flat vector θ of length P.

    SMAT's parameters are flat vectors (θ_pre, δ of length P; log α of shape M×P), so the task model
    is one line of tensor algebra. `unflatten` turns θ back into named views for
    torch.func.functional_call — views, so no copy and gradients flow back into θ.
    """

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.n_params = sum(self.numels)

    def flatten(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in module.named_parameters()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(flat, self.numels)
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def slices(self) -> dict[str, slice]:
        """name -> slice of the flat vector, for per-layer statistics of masks."""
        ends = torch.tensor(self.numels).cumsum(0).tolist()
        return {name: slice(end - n, end) for name, n, end in zip(self.names, self.numels, ends)}


@typechecked
def merge_masks(
    weights: Float[Tensor, " n_experts"], gates: Float[Tensor, "n_experts n_params"]
) -> Float[Tensor, " n_params"]:
    """The task's merged mask Σ_m w_m z_m [M3.1; official: SIE L335]."""
    # in float32 even under autocast: a bf16 matmul would round the mask and keep an M×P bf16 copy
    with torch.autocast(gates.device.type, enabled=False):
        return weights.to(gates.dtype) @ gates


@typechecked
def interpolate(
    theta_pre: Float[Tensor, " n_params"], delta: Float[Tensor, " n_params"], mask: Float[Tensor, " n_params"]
) -> Float[Tensor, " n_params"]:
    """θ_i = θ_pre + mask ⊙ δ [M3.1; official: SIE L434]. mask = 1 gives the dense update."""
    return theta_pre + mask * delta


# Each way of drawing gates z (§2), as a function of (log α, generator), and the temperature t of its
# sigmoid (the fused merge needs it: fused_merge.py, Config.fused_merge). A training task draws by
# Config.mask_sampling: a stochastic hard-concrete sample, or the official noise-free gate.
GATES = {
    "stochastic": (sample_gates, BETA),
    "official": (lambda log_alpha, generator: official_train_gates(log_alpha), BETA),
    "test": (lambda log_alpha, generator: eval_gates(log_alpha), 1.0),
}


# --- § 4 Expert router: a hypernetwork on support prototypes [M3.4] -------------------------


class _SpectralLinear(nn.Linear):
    """A linear layer whose weight is divided by its exact largest singular value.

    NOTE: the official code uses torch's spectral_norm (one power iteration per forward, with state
    that changes on every forward). The exact norm is stateless, so runs split across processes, or
    resumed, see the same router; it costs an SVD of a dim×dim-sized matrix per forward.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / torch.linalg.matrix_norm(self.weight.float(), ord=2).to(self.weight.dtype)
        return F.linear(x, w, self.bias)


class Router(nn.Module):
    """h_ζ: support prototypes of the frozen model -> merging weights w over the M experts.

    Tokens [P_i ; S] (class prototypes, then learnable skill tokens) go through one pre-LN
    transformer block; the output at position 0 is the task embedding e_i; expert logits a = K e_i;
    w = normalise(σ((a + logistic noise) / T_r)) in training, normalise(σ(a / T_r)) at test.
    """

    def __init__(self, dim: int, cfg: Config) -> None:
        super().__init__()
        linear = _SpectralLinear if cfg.router_spectral_norm else nn.Linear
        hidden = int(dim * cfg.router_mlp_ratio)
        self.heads, self.top_k = cfg.router_heads, cfg.router_top_k
        self.tokens = nn.Parameter(torch.randn(cfg.router_tokens, dim) * 1e-3)  # S [official: SIE L97]
        self.keys = nn.Parameter(nn.init.kaiming_normal_(torch.empty(cfg.n_experts, dim)))  # K
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.qkv, self.proj = linear(dim, 3 * dim, bias=False), linear(dim, dim)
        self.fc1, self.fc2 = linear(dim, hidden), linear(hidden, dim)

    def embed(self, prototypes: Tensor) -> Tensor:
        x = torch.cat([prototypes, self.tokens.to(prototypes.dtype)])[None]  # 1 × (n_way + 4) × dim
        qkv = "batch tokens (qkv heads d) -> qkv batch heads tokens d"  # q, k, v one after the other
        q, k, v = rearrange(self.qkv(self.norm1(x)), qkv, qkv=3, heads=self.heads)
        attention = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d) v
        x = x + self.proj(rearrange(attention, "batch heads tokens d -> batch tokens (heads d)"))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x[0, 0]  # position 0 = the first class's slot, as in the official code (no CLS token)

    @typechecked
    def forward(
        self,
        prototypes: Float[Tensor, "n_way dim"],
        temperature: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Float[Tensor, " n_experts"], Float[Tensor, " n_experts"]]:
        """Returns (weights w summing to 1, logits a). A generator means training: noisy gates."""
        logits = self.keys @ self.embed(prototypes.float())
        if generator is not None:  # relaxed Bernoulli sample: logistic noise on the logits
            u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(EPSILON, 1 - EPSILON)
            scores = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
        else:
            scores = torch.sigmoid(logits / temperature)
        if self.top_k:  # top-k routing: the other experts' scores are zeroed before normalising
            scores = scores * torch.zeros_like(scores).scatter_(0, scores.topk(self.top_k).indices, 1.0)
        # NOTE: independent sigmoids normalised to sum to one, not a softmax [official: SIE L348]
        return scores / (scores.sum() + 1e-8), logits


def anneal_tasks(cfg: Config) -> int:
    """Tasks until the router temperature reaches its end value (at least 1)."""
    return max(1, round(cfg.router_anneal_fraction * cfg.episodes))


def router_temperature(cfg: Config, tasks_seen: Tensor) -> Tensor:
    """T_r = max(end, start - (start - end)·n / anneal_tasks), n = tasks seen [official: SIE L473].

    anneal_tasks = round(router_anneal_fraction · episodes): with the official values (5, 0.5, 0.36 of
    50k = 18k) this is exactly max(0.5, 5 - n/4000). A tensor, so reading the counter never waits for
    the device.
    """
    slope = (cfg.router_temperature_start - cfg.router_temperature_end) / anneal_tasks(cfg)
    return (cfg.router_temperature_start - slope * tasks_seen.float()).clamp(min=cfg.router_temperature_end)


# --- § 5 Prototype head and the first-order inner step [M3.5-3.7] ---------------------------


@typechecked
def class_prototypes(
    features: Float[Tensor, "n_support dim"], labels: Int[Tensor, " n_support"], n_way: int
) -> Float[Tensor, "n_way dim"]:
    """W_c = mean of the support features of class c (ProtoNet)."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)  # n_support × n_way
    return (one_hot.T @ features) / one_hot.sum(0)[:, None]


@typechecked
def cosine_logits(
    features: Float[Tensor, "n dim"], prototypes: Float[Tensor, "n_way dim"], scale: float
) -> Float[Tensor, "n n_way"]:
    """ℓ = scale · cos(f(x), W_c), in float32 [official: common.py sim_func]."""
    return scale * F.normalize(features.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


@typechecked
def inner_step(
    theta: Float[Tensor, " n_params"],
    prototypes: Float[Tensor, "n_way dim"],
    support_features: Float[Tensor, "n_support dim"],
    support_labels: Int[Tensor, " n_support"],
    cfg: Config,
) -> tuple[Float[Tensor, " n_params"], Float[Tensor, "n_way dim"]]:
    """One first-order GD step on the support loss, over θ_i and the head W [M3.6].

    θ' = θ - α·∇_θ L_s and W' = W - α·∇_W L_s with the gradients treated as constants (first order),
    so ∂θ'/∂θ = I. The head enters L_s detached; afterwards its graph is re-attached
    (W' + W - sg(W), ProtoMAML's trick) so the query loss still trains the prototype features
    [official: SIE L484-506].
    """
    head = prototypes.detach().requires_grad_()
    support_loss = F.cross_entropy(cosine_logits(support_features, head, cfg.cosine_scale), support_labels)
    grad_theta, grad_head = torch.autograd.grad(support_loss, [theta, head], retain_graph=True)
    return theta - cfg.inner_lr * grad_theta, prototypes - cfg.inner_lr * grad_head


# --- § 6 Meta-objective: dense teacher, distillation, sparsity constraint [M3.8-3.10] -------


# f_θ(x) as a function of the flat parameters θ and the images: SMAT.features
FeaturesOf = Callable[[Float[Tensor, " n_params"], Float[Tensor, "batch channels height width"]],
                      Float[Tensor, "batch dim"]]


@typechecked
def dense_teacher(
    features_of: FeaturesOf,
    theta: Float[Tensor, " n_params"],
    prototypes: Float[Tensor, "n_way dim"],
    query_images: Float[Tensor, "n_query channels height width"],
    query_labels: Int[Tensor, " n_query"],
    cfg: Config,
    student_loss: Float[Tensor, ""] | None = None,
) -> Float[Tensor, "n_query n_way"]:
    """θ^tr: K steps of plain GD on the query loss from sg(θ'), over all P parameters (dense, no mask).

    Returns the teacher's query logits, detached [M3.8; official: SIE L643-666]. `student_loss`,
    the student's query CE at (θ', W'), is the teacher's first loss at the same point, so its graph
    gives the first gradient without another forward pass (and is kept for the student's backward).
    It must reach θ' only through the query features, as after the inner step: were θ' also under
    W', the gradient would include that path, which the teacher (W' held fixed) must not.
    """
    first = (theta, prototypes)
    theta, head = theta.detach(), prototypes.detach()
    for step in range(cfg.teacher_steps):
        if step == 0 and student_loss is not None:
            grads = torch.autograd.grad(student_loss, first, retain_graph=True)
        else:
            theta, head = theta.requires_grad_(), head.requires_grad_()
            logits = cosine_logits(features_of(theta, query_images), head, cfg.cosine_scale)
            grads = torch.autograd.grad(F.cross_entropy(logits, query_labels), [theta, head])
        theta, head = theta.detach() - cfg.teacher_lr * grads[0], head.detach() - cfg.teacher_lr * grads[1]
    with torch.no_grad():
        return cosine_logits(features_of(theta, query_images), head, cfg.cosine_scale)


@typechecked
def distillation(
    student_logits: Float[Tensor, "n_query n_way"],
    teacher_logits: Float[Tensor, "n_query n_way"],
    temperature: float,
    direction: Literal["reverse", "forward"] = "reverse",
) -> Float[Tensor, ""]:
    """(T²/2) · KL at temperature T, averaged over queries; gradient only through the student.

    NOTE: the official code computes KL(student ‖ teacher) — the reverse, mode-seeking direction —
    through F.kl_div with its arguments swapped [official: SIE L678-685]; "forward" is KL(teacher ‖
    student), the usual knowledge-distillation loss.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    if direction == "reverse":
        kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)
    else:
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return temperature**2 / 2 * kl.mean()


@typechecked
def sparsity_penalty(
    weights: Float[Tensor, " n_experts"],
    multipliers: Float[Tensor, " n_experts"],
    density: Float[Tensor, " n_experts"],
    target_sparsity: float,
) -> Float[Tensor, ""]:
    """Primal term of the Lagrangian, Σ_m sg(w_m)·sg(λ_m)·(Ê_m - (1 - τ)) [M3.9].

    The constraint is ŝ_m ≥ τ for every expert m. This term pushes the expected density Ê_m of each
    expert the task selects down while its multiplier is positive; the multipliers themselves move by
    dual ascent in §8.
    """
    return (weights.detach() * multipliers.detach() * (density - (1.0 - target_sparsity))).sum()


@typechecked
def dual_ascent(
    multipliers: Float[Tensor, " n_experts"],
    violation: Float[Tensor, " n_experts"],
    sparsity: Float[Tensor, " n_experts"],
    target_sparsity: float,
    lr: float,
) -> Float[Tensor, " n_experts"]:
    """λ_m ← λ_m + η_λ·mean_i w_im(τ - ŝ_im), then λ_m ← 0 where the constraint ŝ_m ≥ τ holds.

    `violation` is the meta-batch mean of w_m(τ - ŝ_m). Growing λ while an expert is too dense and
    resetting it once it is sparse enough is what the official code does with SGD on
    Σ w λ (ŝ - τ) and an in-place reset [official: SIE L695-702]; here it is written out.
    """
    updated = multipliers + lr * violation
    return torch.where(sparsity >= target_sparsity, torch.zeros_like(updated), updated)


# --- § 7 The model, one meta-training step, and zero-shot prediction -----------------------------


class SMAT(nn.Module):
    """The frozen backbone as a flat θ_pre, the expert pool (δ, log α), the router, the multipliers."""

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = ParamLayout(backbone)
        self.register_buffer("theta_pre", self.layout.flatten(backbone).float().clone())
        # The backbone module is kept only as an architecture: its weights live in θ_pre, so it
        # sits on the "meta" device (no storage) and is never registered (not in the state dict).
        self.__dict__["architecture"] = backbone.requires_grad_(False).to("meta")
        self.feature_dim = backbone.feature_dim
        self.delta = nn.Parameter(torch.zeros(self.layout.n_params))  # δ = 0: θ_i = θ_pre at start
        if cfg.has_masks:  # NOTE: this order of random draws (log α, then the router) is pinned by tests/golden.json
            self.log_alpha = nn.Parameter(torch.randn(cfg.n_experts, self.layout.n_params) * cfg.mask_init_std)
        if cfg.has_router:
            self.router = Router(self.feature_dim, cfg)
        self.register_buffer("multipliers", torch.zeros(cfg.n_experts))  # λ, saved unlike HEAD
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.long))  # drives T_r

    def features(self, theta: Tensor, images: Tensor) -> Tensor:
        """f_θ(x): the backbone's CLS feature with its weights taken from the flat vector θ."""
        return functional_call(self.architecture, self.layout.unflatten(theta), (images,))

    @typechecked
    def task_parameters(
        self,
        pre_prototypes: Float[Tensor, "n_way dim"] | None,
        generator: torch.Generator | None = None,
        gates: Float[Tensor, "n_experts n_params"] | None = None,
    ) -> "TaskParameters":
        """θ_i from the router and the experts [M3.1, M3.4].

        A generator means training (sampled gates); without one, the deterministic test gates, which
        `gates` may pass in precomputed (they do not depend on the task). PMF has no router and no
        masks: θ_i = θ_pre + δ, w = (1), and no router logits or gates.
        """
        if not (self.cfg.has_router and self.cfg.has_masks):  # PMF: one dense expert, θ_i = θ_pre + δ
            return TaskParameters(self.theta_pre + self.delta, torch.ones(1, device=self.delta.device))
        weights, logits = self.router(pre_prototypes, router_temperature(self.cfg, self.tasks_seen), generator)
        if generator is None:  # test time: Louizos+18's estimator, β = 1, in both sampling modes
            gates = eval_gates(self.log_alpha) if gates is None else gates
        elif self.cfg.fused_merge:  # the same θ_i and gradients, keeping less for backward (GPU memory)
            theta, gates = fused_merge.MergeExperts.apply(self.theta_pre, self.delta, weights, self.log_alpha,
                                                          *GATES[self.cfg.mask_sampling], (GAMMA, ZETA), generator)
            return TaskParameters(theta, weights, logits, gates)
        else:
            gates = GATES[self.cfg.mask_sampling][0](self.log_alpha, generator)
        return TaskParameters(interpolate(self.theta_pre, self.delta, merge_masks(weights, gates)), weights,
                              logits, gates)


@typechecked
@dataclass
class TaskParameters:
    """What `SMAT.task_parameters` makes for one task."""

    theta: Float[Tensor, " n_params"]  # θ_i
    weights: Float[Tensor, " n_experts"]  # w, the router's merging weights (PMF: the one expert, 1)
    router_logits: Float[Tensor, " n_experts"] | None = None  # a = K e_i (None for PMF: no router)
    gates: Float[Tensor, "n_experts n_params"] | None = None  # z (None for PMF: no masks)


@dataclass
class StepOutput:
    """What one meta-training task returns: the loss to back-propagate and detached diagnostics."""

    loss: Tensor  # scalar, with graph
    terms: dict[str, Tensor]  # detached scalars: ce, distill, sparsity, router_penalty, accuracies ...
    weights: Tensor  # w, n_experts
    hard_sparsity: Tensor  # ŝ, n_experts (zeros for PMF)
    violation: Tensor  # w ⊙ (τ - ŝ), n_experts: this task's contribution to dual ascent


@typechecked
def meta_train_step(
    model: SMAT,
    support_images: Float[Tensor, "n_support channels height width"],
    support_labels: Int[Tensor, " n_support"],
    query_images: Float[Tensor, "n_query channels height width"],
    query_labels: Int[Tensor, " n_query"],
    n_way: int,
    generator: torch.Generator,
) -> StepOutput:
    """One meta-training task: the SMAT loss L_i of [M3.10], ready for backward.

    `generator` draws every random number of the task (router noise, gate samples), so a task is a
    pure function of its data and its seed: resumed and multi-process runs repeat it exactly.
    """
    cfg, n_support = model.cfg, len(support_labels)
    # 1) The frozen model, once over support ∪ query: its support prototypes feed the router, its
    #    query logits the extra KL [M3.4, M3.8].
    with torch.no_grad():
        pre = model.features(model.theta_pre, torch.cat([support_images, query_images]))
        pre_prototypes = class_prototypes(pre[:n_support], support_labels, n_way)
        pre_logits = cosine_logits(pre[n_support:], pre_prototypes, cfg.cosine_scale)
    # 2) Router -> merging weights w; sampled gates z; task model θ_i = θ_pre + (Σ w_m z_m) ⊙ δ.
    task = model.task_parameters(pre_prototypes, generator)
    theta, weights = task.theta, task.weights
    sparsity = torch.zeros(cfg.n_experts, device=theta.device)  # ŝ that the constraint counts [M3.9]
    if cfg.has_constraint:  # NOTE: on the test gates by default, the gates of the model that is evaluated
        sparsity = hard_sparsity(task.gates) if cfg.constraint_gates == "sampled" else eval_sparsity(model.log_alpha)
    task.gates = None  # M×P, and nothing below needs it: keep it out of the step's peak memory
    # 3) Prototype head from θ_i, then one first-order GD step on the support set.
    support_features = model.features(theta, support_images)
    prototypes = class_prototypes(support_features, support_labels, n_way)
    if cfg.inner_step:
        theta, prototypes = inner_step(theta, prototypes, support_features, support_labels, cfg)
    # 4) Student query loss; its graph also gives the teacher's first gradient (same point, same loss).
    query_logits = cosine_logits(model.features(theta, query_images), prototypes, cfg.cosine_scale)
    ce = F.cross_entropy(query_logits, query_labels)
    loss, terms = ce, {"ce": ce.detach()}
    # 5) Distillation, L = (1-κ)·CE + κ·KD: KD to the dense teacher and KD to the frozen model, each
    #    with its own switch; without either the loss is plain CE.
    accuracy = _accuracy(query_logits, query_labels)
    distill_terms = []
    if cfg.teacher:
        reuse = ce if cfg.inner_step else None  # without the inner step θ_i is under W as well
        teacher_logits = dense_teacher(model.features, theta, prototypes, query_images, query_labels, cfg, reuse)
        distill_terms.append(distillation(query_logits, teacher_logits, cfg.distill_temperature, cfg.distill_direction))
    if cfg.kl_to_pretrained:
        distill_terms.append(distillation(query_logits, pre_logits, cfg.distill_temperature, cfg.distill_direction))
    if distill_terms:
        distill = sum(distill_terms[1:], distill_terms[0])
        loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * distill
        terms["distill"] = distill.detach()
    if cfg.teacher:  # how much the teacher knows that the student does not: a teacher that teaches leads
        teacher_accuracy = _accuracy(teacher_logits, query_labels)
        terms |= {"teacher_accuracy": teacher_accuracy, "teacher_lead": teacher_accuracy - accuracy}
    # 6) Lagrangian sparsity constraint, weighted by this task's w, and the router-logit penalty.
    if cfg.has_constraint:
        penalty = sparsity_penalty(weights, model.multipliers, expected_density(model.log_alpha), cfg.sparsity)
        loss = loss + penalty
        terms["sparsity_penalty"] = penalty.detach()
    if cfg.has_router:
        router_penalty = cfg.router_logit_penalty * task.router_logits.pow(2).mean()
        loss = loss + router_penalty
        terms["router_penalty"] = router_penalty.detach()
    terms |= {"loss": loss.detach(), "accuracy": accuracy,
              "pretrained_accuracy": _accuracy(pre_logits, query_labels)}
    violation = weights.detach() * (cfg.sparsity - sparsity) if cfg.has_constraint else sparsity
    return StepOutput(loss, terms, weights.detach(), sparsity, violation)


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()


@dataclass
class Prediction:
    logits: Tensor  # n_query × n_way
    weights: Tensor  # the router's merging weights for this task, n_experts


@torch.no_grad()
def task_model(
    model: SMAT, support_images: Tensor, support_labels: Tensor, n_way: int, pretrained: bool = False,
    gates: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(θ_i, w) for meta-testing: the router on θ_pre's support prototypes, then the test gates.

    `pretrained=True` gives θ_pre itself (the "Pre" baseline); `gates` may hold eval_gates(log α),
    computed once for many episodes.
    """
    if pretrained:
        return model.theta_pre, torch.zeros(model.cfg.n_experts, device=support_images.device)
    pre_prototypes = None
    if model.cfg.has_router:
        pre_prototypes = class_prototypes(model.features(model.theta_pre, support_images), support_labels, n_way)
    task = model.task_parameters(pre_prototypes, gates=gates)
    return task.theta, task.weights


@typechecked
@torch.no_grad()
def predict(
    model: SMAT,
    support_images: Float[Tensor, "n_support channels height width"],
    support_labels: Int[Tensor, " n_support"],
    query_images: Float[Tensor, "n_query channels height width"],
    n_way: int,
    pretrained: bool = False,
    gates: Tensor | None = None,
) -> Prediction:
    """Zero-shot meta-testing [M5.1]: router (deterministic) -> test gates -> θ_i -> ProtoNet.

    No inner step, no teacher. `pretrained=True` is the "Pre" baseline: ProtoNet on θ_pre itself.
    """
    n_support = len(support_labels)
    theta, weights = task_model(model, support_images, support_labels, n_way, pretrained, gates)
    features = model.features(theta, torch.cat([support_images, query_images]))
    prototypes = class_prototypes(features[:n_support], support_labels, n_way)
    return Prediction(cosine_logits(features[n_support:], prototypes, model.cfg.cosine_scale), weights)


# --- § 8 Meta-update: optimisers, clipping, dual ascent [M3.9, M3.11] -----------------------


class NonFiniteLoss(RuntimeError):
    """A loss term is inf or nan: the meta-update stops before any parameter changes. The message
    names the term; train.py adds the step and the last good checkpoint."""


@dataclass
class MetaBatch:
    """One meta-batch after its update, for logging: the reduced statistics the update used."""

    stats: dict[str, Tensor]  # every StepOutput.terms entry, mean over the meta-batch's tasks
    violation: Tensor  # mean_i w_i ⊙ (τ - ŝ_i), n_experts: what dual ascent added to λ (over η_λ)
    sparsity: Tensor  # mean_i ŝ_i, n_experts: what decided which λ_m reset to 0
    weights: Tensor  # this process's tasks' w, tasks × n_experts


class MetaOptimizer:
    """The official optimiser set-up [official: SIE L737-760, trainer L119-122, L333-344].

    SGD (momentum 0.9, weight decay) on δ; plain SGD with a huge learning rate and grad-norm clip on
    log α, then the clamp to ±log 100 (so most log α jump to a bound, where the test gate is exactly
    0 or 1; docs/results.md measures the share);
    AdamW with clip 1 on the router; explicit dual ascent on λ. `lr_scale` is the schedule's factor
    and multiplies every optimiser's lr, not the dual step η_λ (NOTE: the official scheduler anneals
    it too, which left the constraint unmet at the end of short runs; docs/deviations.md).
    """

    def __init__(self, model: SMAT) -> None:
        cfg = model.cfg
        self.model = model
        self.delta = torch.optim.SGD(
            [model.delta], lr=cfg.delta_lr, momentum=cfg.delta_momentum, weight_decay=cfg.delta_weight_decay
        )
        self.optimizers = {"delta": self.delta}
        if cfg.has_masks:
            self.optimizers["mask"] = torch.optim.SGD([model.log_alpha], lr=cfg.mask_lr)
        if cfg.has_router:
            self.optimizers["router"] = torch.optim.AdamW(
                model.router.parameters(), lr=cfg.router_lr, weight_decay=cfg.router_weight_decay
            )
        self.base_lr = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    def step(self, lr_scale: float, violation: Tensor, sparsity: Tensor, scaler=None) -> None:
        """Apply the accumulated gradients; `violation`, `sparsity`: meta-batch means, n_experts."""
        model, cfg = self.model, self.model.cfg
        for name, opt in self.optimizers.items():
            opt.param_groups[0]["lr"] = self.base_lr[name] * lr_scale
            if scaler is not None:
                scaler.unscale_(opt)
        if cfg.has_masks:
            nn.utils.clip_grad_norm_([model.log_alpha], cfg.mask_clip)
        if cfg.has_router:
            nn.utils.clip_grad_norm_(model.router.parameters(), cfg.router_clip)
        for opt in self.optimizers.values():
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        if cfg.has_masks:
            with torch.no_grad():
                model.log_alpha.clamp_(-cfg.log_alpha_bound, cfg.log_alpha_bound)
        if cfg.has_constraint:
            with torch.no_grad():
                model.multipliers.copy_(  # η_λ is not annealed: the constraint must hold at the end
                    dual_ascent(model.multipliers, violation, sparsity, cfg.sparsity, cfg.multiplier_lr)
                )

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def meta_update(model: SMAT, optimizer: MetaOptimizer, outputs: list[StepOutput], lr_scale: float,
                scaler: torch.amp.GradScaler | None = None) -> MetaBatch:
    """One outer step from a meta-batch of tasks [M3.11], after each task's backward of
    L_i / meta_batch (so the gradients hold the meta-batch mean).

    With torch.distributed initialised, each of the `world` processes holds meta_batch / world of
    the tasks: gradients and the dual statistics are summed over processes and the logged stats
    averaged, so N processes take the step one process would (tests/test_train.py holds it to that).
    A non-finite stat raises NonFiniteLoss before any parameter changes.
    """
    # 1) Reduce over this process's tasks: dual statistics as sums over meta_batch, stats as means.
    meta_batch = model.cfg.meta_batch
    stats = {k: torch.stack([o.terms[k] for o in outputs]).mean() for k in outputs[0].terms}
    violation = torch.stack([o.violation for o in outputs]).sum(0) / meta_batch
    sparsity = torch.stack([o.hard_sparsity for o in outputs]).sum(0) / meta_batch
    # 2) Across processes: sums of the gradients and of the dual statistics = one big meta-batch.
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
        n = len(violation)
        packed = torch.cat([violation, sparsity, torch.stack(list(stats.values()))])
        dist.all_reduce(packed)
        violation, sparsity = packed[:n], packed[n: 2 * n]
        stats = dict(zip(stats, packed[2 * n:] / dist.get_world_size()))
    # 3) Never step on inf/nan (one host sync per step, for all the statistics at once).
    finite = torch.stack(list(stats.values())).isfinite()
    if not finite.all():
        raise NonFiniteLoss(f"non-finite {next(name for name, ok in zip(stats, finite.tolist()) if not ok)}")
    # 4) The optimisers (lr × lr_scale), clipping, the clamp of log α and dual ascent on λ.
    optimizer.step(lr_scale, violation, sparsity, scaler)
    return MetaBatch(stats, violation, sparsity, torch.stack([o.weights for o in outputs]))
