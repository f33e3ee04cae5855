# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A guided tour of SMAT: one task, from images to loss
#
# This notebook follows **one meta-training task** of the default run (`python train.py --sparsity 0.9
# --experts 8`) through `smat.meta_train_step`, step by step, calling the project's own functions
# (never a copy of them), then trains for 200 episodes and draws the curves. Each step names its place
# in `smat.py` (function and §) and its row in `docs/method.md` (the `[M…]` tags: this project's
# numbering of the method's parts, not the paper's sections). It runs on CPU with the shipped stand-in
# backbone (`weights/tiny.pt`) and the embedded benchmark, with no download: 35 s (30 s of CPU) on a
# 2-core CPU sandbox with the benchmark already cached (2026-12-06; building it first adds about 5 s).
#
# **Regenerate** (from the repository root, with `pip install -e ".[tour]"`; the source is the plain
# text `docs/tour.py`, this notebook is made from it):
#
# ```bash
# jupytext --update --to notebook docs/tour.py -o docs/tour.ipynb && jupyter execute --inplace docs/tour.ipynb
# ```
#
# `tests/test_tour.py` runs the source from scratch and checks that this notebook's cells match it.
#
# SMAT in one line [M3.1]: a task $i$ gets its own weights
#
# $$\theta_i = \theta^{pre} + \Big(\sum_{m=1}^{M} w_{i,m}\, z_m\Big) \odot \theta^{\delta},$$
#
# the frozen pre-trained weights plus a shared dense update $\theta^\delta$ (δ), seen through a mix of
# $M$ sparse masks $z_m$ (the experts) with merging weights $w_i$ that a router reads off the task's
# support set.

# %%
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "smat.py").is_file())
sys.path.insert(0, str(ROOT))  # the project's files are run from the repository root

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

import backbone
import data
import smat
import train
from monitor import PERCENT_FIELDS, router_entropy  # accuracies in %, as metrics.jsonl logs them
from pictures import kept_by_module

# One thread: the model is tiny, and a fixed thread count makes every number below repeat bit for bit.
torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 72, "font.size": 9})


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The percentage of queries whose largest logit is their class (accuracies are in % everywhere)."""
    return 100 * (logits.argmax(1) == labels).float().mean().item()

# %% [markdown]
# ## 0. The default run's model and data
#
# `smat.Config()` (§1) holds every hyper-parameter of the default run: $M = 8$ experts, target
# sparsity $\tau = 0.9$ [M3.9], 5-way 5-shot training episodes with 10 queries per class. The data are
# the embedded benchmark, loaded as `train.py` loads them (`train.load_sources`; built once and cached in
# `$SMAT_CACHE`, default `~/.cache/smat`). The frozen backbone $\theta^{pre}$ is the tiny stand-in ViT
# [M1.2], read from `weights/tiny.pt` after its SHA-256 check. The model is built as `train.py` builds
# it: the backbone read first (building it draws random numbers), then the seed, then
# `smat.SMAT(backbone, cfg)` (§7), which flattens the backbone into one vector of $P$ numbers and
# creates δ, $\log\alpha$, the router and the multipliers λ.

# %%
cfg = smat.Config()
sources = train.load_sources(cfg, data.default_cache_dir())
vit = backbone.resolve_backbone(cfg.backbone)
torch.manual_seed(cfg.seed)
model = smat.SMAT(vit, cfg)

router_size = sum(p.numel() for p in model.router.parameters())
print(f"P = {model.layout.n_params:,} numbers in {len(model.layout.names)} tensors; M = {cfg.n_experts}")
print(f"log α: {tuple(model.log_alpha.shape)}, router: {router_size:,} numbers")
print("δ is zero at the start:", bool((model.delta == 0).all()), "| λ:", model.multipliers.tolist())
print("ID domains (meta-training):", [s.name for s in sources if s.split == "id"])

# %% [markdown]
# ## 1. One 5-way 5-shot episode
#
# Episode 0 of the training stream, `data.training_episode(sources, protocol, seed, index)` (`data.py`;
# the episode setting is row [M1.3-1.5], here in its fixed 5-way 5-shot CPU form): an ID
# domain picked at random, 5 of its training classes, 5 support and 10 query images per class, with
# training augmentation. It is a pure function of (seed, index): `train.py` trains on exactly this
# task first. Each row below is one class: its support set $T_i^s$ on the left, its queries $T_i^q$ on
# the right.

# %%
episode = data.training_episode(sources, data.protocol(cfg, "train"), cfg.seed, 0, cfg.image_size)
xs, ys, xq, yq, n_way = (episode.support_images, episode.support_labels, episode.query_images,
                         episode.query_labels, episode.n_way)
mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
rows = [torch.cat([xs[ys == c], xq[yq == c]]) * std + mean for c in range(n_way)]  # undo the normalisation
grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=len(rows[0]), padding=2, pad_value=1.0)
plt.figure(figsize=(10, 3.8))
plt.imshow(grid.permute(1, 2, 0).numpy())
plt.axvline(5 * 34 + 1, color="red", linewidth=2)
plt.title(f"domain '{episode.domain}': support (5 per class) | query (10 per class)")
plt.axis("off")
plt.show()

# %% [markdown]
# ## 2. The frozen model's prototypes, and the router reading them
#
# **Prototypes** [M3.4, M3.5] (`class_prototypes`, §5): the frozen backbone's feature of each support
# image, $f_{\theta^{pre}}(x)$ (`SMAT.features`, the CLS feature after the final LayerNorm), averaged
# per class: $p_c = \frac{1}{|S_c|}\sum_{x\in S_c} f_{\theta^{pre}}(x)$. Queries are classified by the
# cosine logits $\ell(x) = 10\cos(f(x), p_c)$ (`cosine_logits`, §5). `meta_train_step` runs the frozen
# model once over support and query: the prototypes feed the router, the query logits a KL term later.

# %%
with torch.no_grad():
    pre = model.features(model.theta_pre, torch.cat([xs, xq]))
    pre_prototypes = smat.class_prototypes(pre[: len(ys)], ys, n_way)
    pre_logits = smat.cosine_logits(pre[len(ys):], pre_prototypes, cfg.cosine_scale)
print(f"prototypes {tuple(pre_prototypes.shape)}")
print(f"frozen model's query accuracy {accuracy(pre_logits, yq):.1f} %")

# %% [markdown]
# **The router** $h_\zeta$ [M3.4] (`Router`, §4) reads the prototypes: tokens $[P_i; S]$ (the $n$
# prototypes, then 4 learnable "skill" tokens $S$) pass one transformer block; the output at position 0
# is the task embedding $e_i$; the expert logits are $a_i = K e_i$ with learnable keys $K$. The merging
# weights are independent sigmoids normalised to sum to one (not a softmax):
#
# $$s_m = \sigma\!\Big(\frac{a_m + \epsilon_m}{T_r}\Big),\ \epsilon_m \sim \mathrm{Logistic}(0,1),\qquad w_m = \frac{s_m}{\sum_{m'} s_{m'}}.$$
#
# - **Noise** $\epsilon$ (training only, drawn from the task's generator): a relaxed Bernoulli sample,
#   so the router explores mixes of experts; at test time $\epsilon = 0$.
# - **Temperature** $T_r$ (`router_temperature`, §4), annealed with the tasks seen $n$:
#   $T_r = \max(0.5,\ 5 - 4.5\, n / n_{anneal})$, $n_{anneal}$ = half the run (400 tasks here). Hot
#   ($T_r = 5$) squashes every $s_m$ towards $\sigma(0) = 0.5$, so $w$ is near uniform and every expert
#   learns; cold ($T_r = 0.5$) lets the logits pick experts.
#
# `SMAT.task_parameters` (§7) calls the router, then draws the gates; with the task's generator
# (`train.episode_generator`) it draws exactly what `meta_train_step` draws for this task.

# %%
generator = train.episode_generator(cfg.seed, 0, torch.device("cpu"))
task = model.task_parameters(pre_prototypes, generator)  # router (noisy w), then sampled gates z
weights = task.weights
T_start = smat.router_temperature(cfg, model.tasks_seen)
w_test, logits = model.router(pre_prototypes, T_start)  # test time: no noise
w_cold, _ = model.router(pre_prototypes, torch.tensor(cfg.router_temperature_end))
print(f"T_r at n = {model.tasks_seen.item()}: {T_start.item():.2f}; logits a =", np.round(logits.tolist(), 2))

# %%
experts = np.arange(cfg.n_experts)
figure, axes = plt.subplots(1, 1, figsize=(8, 2.6))
for k, (name, w) in enumerate([("T_r = 5, test (no noise)", w_test), ("T_r = 5, this task's sample", weights),
                               ("T_r = 0.5, test (no noise)", w_cold)]):
    w = w.detach()
    axes.bar(experts + (k - 1) * 0.27, w, width=0.27, label=f"{name}: H(w) = {router_entropy(w[None]):.2f}")
axes.axhline(1 / cfg.n_experts, color="grey", linestyle=":", linewidth=1)
axes.set(xlabel="expert m", ylabel="w_m",
         title=f"merging weights (uniform = 1/M; entropy at most log M = {np.log(cfg.n_experts):.2f})")
axes.legend(fontsize=8)
plt.show()

# %% [markdown]
# The keys $K$ start random, yet their logits already differ by several units: at $T_r = 5$ they are
# divided down and $w$ stays close to uniform (entropy near $\log M$); the same logits at $T_r = 0.5$
# would already pick a few experts. Annealing $T_r$ over half the run lets every expert learn before the
# router commits; the noise keeps it exploring (section 8 tracks the entropy).
#
# ## 3. The experts' hard-concrete gates
#
# Each expert $m$ owns one logit $\log\alpha_{m,j}$ per backbone number $j$ [M3.2] (`SMAT.log_alpha`,
# $M \times P$, initialised $\mathcal{N}(0, 0.5^2)$). Its gate is a stretched hard-concrete variable
# (Louizos, Welling & Kingma 2018), with $\beta = 2/3$, $(\gamma, \zeta) = (-0.1, 1.1)$:
#
# $$u \sim U(0,1),\quad s = \sigma\!\Big(\frac{\log u - \log(1-u) + \log\alpha}{\beta}\Big),\quad z = \min\big(1, \max(0,\ s(\zeta-\gamma)+\gamma)\big)$$
#
# in training (`sample_gates`, §2: stochastic, reparameterised, yet exactly 0 or 1 with non-zero
# probability), and the deterministic test gate $\hat z = \min(1, \max(0, \sigma(\log\alpha)(\zeta-\gamma)+\gamma))$
# (`eval_gates`, §2). The expected L0 norm, as a fraction of $P$, is differentiable in $\log\alpha$:
#
# $$\hat E_m = \frac{1}{P}\sum_j P(z_{m,j} \neq 0) = \frac{1}{P}\sum_j \sigma\big(\log\alpha_{m,j} - \beta\log(-\gamma/\zeta)\big)$$
#
# (`expected_density`, §2). The constraint counts the hard sparsity $\hat s_m = \#(\hat z_m = 0)/P$ of
# the test gates (`eval_sparsity`; by default, see `docs/deviations.md`).

# %%
sampled, test_gates = task.gates.detach(), smat.eval_gates(model.log_alpha.detach())
for name, z in [("training sample z", sampled), ("test gates ẑ", test_gates)]:
    print(f"{name:18}: exactly 0 {(z == 0).float().mean():.3f}, exactly 1 {(z == 1).float().mean():.3f}, "
          f"in between {((z > 0) & (z < 1)).float().mean():.3f}")
density = smat.expected_density(model.log_alpha.detach())
print("expected L0 Ê_m per expert:", np.round(density.tolist(), 3))
print("sample's ŝ_m:", np.round(smat.hard_sparsity(sampled).tolist(), 3),
      "| test gates' ŝ_m:", np.round(smat.eval_sparsity(model.log_alpha).tolist(), 3))

# %%
figure, axes = plt.subplots(1, 2, figsize=(10, 2.6))
axes[0].hist(model.log_alpha[0].detach(), bins=60, color="grey")
threshold = np.log(-smat.GAMMA / smat.ZETA)
axes[0].axvline(threshold, color="red", linestyle=":", label=f"ẑ = 0 below log(-γ/ζ) = {threshold:.2f}")
axes[0].set(title="log α of expert 0", xlabel="log α")
axes[0].legend(fontsize=8)
axes[1].hist([sampled[0], test_gates[0]], bins=24, label=["training sample z", "test gates ẑ"])
axes[1].set(title="gates of expert 0", xlabel="z", yscale="log")
axes[1].legend(fontsize=8)
plt.show()


# %% [markdown]
# By block and module type: `pictures.kept_by_module` pools the backbone's tensors (named as DINO
# names them: `blocks.3.attn.qkv.weight` is block 3's `qkv`), each weighted by its size. At
# initialisation every part has the same expected L0, about $\sigma(1.6) \approx 0.82$; section 9
# shows where the trained experts keep their parameters.

# %%
def by_module(per_tensor: torch.Tensor) -> None:
    """Heat map of an experts × P quantity, averaged per (block, module type) and over the experts."""
    slices = model.layout.slices()
    blocks, types, table = kept_by_module({"experts": {
        "kept_fraction": {name: per_tensor[:, s].mean(1).tolist() for name, s in slices.items()},
        "parameters": {name: s.stop - s.start for name, s in slices.items()}}})
    mean_table = table.mean(0).numpy()
    plt.figure(figsize=(7, 3.2))
    plt.imshow(mean_table, vmin=0, vmax=1, cmap="viridis")
    for (r, c), value in np.ndenumerate(mean_table):
        plt.text(c, r, "" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    plt.xticks(range(len(types)), types)
    plt.yticks(range(len(blocks)), blocks)
    plt.colorbar()


offset = -smat.BETA * np.log(-smat.GAMMA / smat.ZETA)  # -β log(-γ/ζ) = 1.60
by_module(torch.sigmoid(model.log_alpha.detach() + offset))  # P(z ≠ 0) per number; its mean is Ê_m
plt.title("expected L0 (kept fraction), mean over experts")
plt.show()

# %% [markdown]
# ## 4. The merged mask and the task model
#
# `merge_masks` (§3) mixes the experts' gates with the router's weights, $\sum_m w_m z_m$, and
# `interpolate` (§3) applies it to the shared update [M3.1, M3.3]:
#
# $$\theta_i = \theta^{pre} + \Big(\sum_m w_m z_m\Big) \odot \theta^{\delta}.$$
#
# A backbone number is *touched* by task $i$ when its merged mask is non-zero, i.e. when at least one
# expert with weight $w_m > 0$ keeps it. `SMAT.task_parameters` did exactly this (the `assert`s hold the
# tour to the code: a cell that fails them stops the notebook):

# %%
mask = smat.merge_masks(weights.detach(), sampled)
theta = smat.interpolate(model.theta_pre, model.delta, smat.merge_masks(weights, task.gates))
assert torch.equal(theta, task.theta)  # the same θ_i as SMAT.task_parameters
print(f"merged mask: min {mask.min():.3f}, mean {mask.mean():.3f}, max {mask.max():.3f}; "
      f"touched (mask ≠ 0): {(mask != 0).float().mean():.4f} of P")
assert torch.equal(task.theta, model.theta_pre)  # δ = 0 at the start: θ_i = θ_pre exactly

# %% [markdown]
# Two facts of a fresh model, shown as they are: every expert keeps about 82 % of the backbone, so the
# merge of eight of them touches almost all of it; and δ = 0 [M3.3], so $\theta_i = \theta^{pre}$
# whatever the mask. The mask still matters from the first step: the gradient of the loss reaches δ
# through it (section 7). After training (section 9) each expert keeps fewer numbers and δ ≠ 0.
#
# ## 5. The prototype head and the inner step
#
# Under $\theta_i$ the head is the class means of the support features, $W_c$ (`class_prototypes`,
# [M3.5]). Then one first-order gradient step on the support loss $L_s$, over all of $\theta_i$ and the
# head (`inner_step`, §5, [M3.6-3.7]):
#
# $$\theta_i' = \theta_i - \alpha_{in}\,\mathrm{sg}(\nabla_{\theta_i} L_s),\qquad W' = W - \alpha_{in}\,\mathrm{sg}(\nabla_W L_s),$$
#
# first order (sg = stop-gradient: $\partial\theta_i'/\partial\theta_i = I$), with $W'$ re-attached to
# the graph of the support features so that the query loss still trains them.

# %%
theta = task.theta
support_features = model.features(theta, xs)
prototypes = smat.class_prototypes(support_features, ys, n_way)


support_loss = F.cross_entropy(smat.cosine_logits(support_features, prototypes, cfg.cosine_scale), ys)
before = smat.cosine_logits(model.features(theta, xq), prototypes, cfg.cosine_scale)
theta1, prototypes1 = smat.inner_step(theta, prototypes, support_features, ys, cfg)
query_logits = smat.cosine_logits(model.features(theta1, xq), prototypes1, cfg.cosine_scale)
support_after = F.cross_entropy(
    smat.cosine_logits(model.features(theta1, xs), prototypes1, cfg.cosine_scale), ys)
print(f"support loss {support_loss:.4f} -> {support_after:.4f} after one step (α_in = {cfg.inner_lr})")
print(f"query accuracy {accuracy(before, yq):.1f} % -> {accuracy(query_logits, yq):.1f} %, "
      f"query CE {F.cross_entropy(before, yq):.4f} -> {F.cross_entropy(query_logits, yq):.4f}")

# %% [markdown]
# One small step moves little: its job in meta-training is to make the meta-gradient ask for weights
# that adapt well, not to fit this support set. The student's query loss is the cross-entropy
# $\mathrm{CE}(\ell_q, y_q)$ at $(\theta_i', W')$.
#
# ## 6. The dense teacher and the student
#
# The teacher [M3.8] (`dense_teacher`, §6) starts from $\mathrm{sg}(\theta_i')$ and takes $K = 1$ plain
# gradient step on the **query** loss over all $P$ numbers (dense, no mask) and the head $W'$, with its
# own rate $\eta_T$:
#
# $$\theta^{tr}_{1} = \theta^{tr}_0 - \eta_T \nabla L_{CE}(\theta^{tr}_0; T_i^q),\qquad \theta^{tr}_0 = \mathrm{sg}(\theta_i').$$
#
# It has seen the queries' labels, so it leads the student; its logits are detached. The student is
# pulled towards it, and towards the frozen model, by the distillation term (`distillation`, §6), at
# temperature $T = 2$, in the reverse (mode-seeking) direction the official code uses:
#
# $$L^{kd} = \frac{T^2}{2}\Big[\mathrm{KL}(p_s^T\,\|\,p_{tr}^T) + \mathrm{KL}(p_s^T\,\|\,p_{pre}^T)\Big].$$

# %%
ce = F.cross_entropy(query_logits, yq)
teacher_logits = smat.dense_teacher(model.features, theta1, prototypes1, xq, yq, cfg, ce)  # reuses ce's graph
kd_teacher = smat.distillation(query_logits, teacher_logits, cfg.distill_temperature, cfg.distill_direction)
kd_pre = smat.distillation(query_logits, pre_logits, cfg.distill_temperature, cfg.distill_direction)
print(f"query accuracy: frozen {accuracy(pre_logits, yq):.1f} %, student {accuracy(query_logits, yq):.1f} %, "
      f"teacher {accuracy(teacher_logits, yq):.1f} %")
print(f"KD to the teacher {kd_teacher:.4f}, KD to the frozen model {kd_pre:.4f}")

# %%
shown = torch.cat([torch.nonzero(yq == c)[:2, 0] for c in range(n_way)])  # two queries per class
figure, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharey=True)
for ax, (name, lg) in zip(axes, [("frozen model", pre_logits), ("student (θ_i', W')", query_logits),
                                 ("dense teacher", teacher_logits)]):
    p = F.softmax(lg[shown].detach() / cfg.distill_temperature, 1)
    ax.imshow(p, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set(title=f"{name}: p at T = {cfg.distill_temperature:g}", xlabel="class")
axes[0].set_yticks(range(len(shown)), [f"query of class {c}" for c in yq[shown].tolist()])
plt.show()

# %% [markdown]
# ## 7. Every loss term, where its gradient goes, and one dual-ascent step
#
# The **sparsity constraint** [M3.9] asks $\hat s_m \ge \tau$ of every expert. Its Lagrangian's primal
# term (`sparsity_penalty`, §6) pushes the expected density of the experts this task uses down while
# their multipliers are positive:
#
# $$L_{sp} = \sum_m \mathrm{sg}(w_m)\,\mathrm{sg}(\lambda_m)\,\big(\hat E_m - (1-\tau)\big).$$
#
# The **total task loss** [M3.10] (`meta_train_step`, §7) adds a small penalty on the router's logits:
#
# $$L_i = (1-\kappa)\,\mathrm{CE}(\ell_q, y_q) + \kappa L^{kd} + L_{sp} + 10^{-4}\,\overline{a^2},\qquad \kappa = 0.25.$$
#
# Assembled from the pieces above, it is `meta_train_step`'s loss for this task:

# %%
terms = {
    "ce": ce, "distill_teacher": kd_teacher, "distill_pre": kd_pre,
    "sparsity_penalty": smat.sparsity_penalty(weights, model.multipliers,
                                              smat.expected_density(model.log_alpha), cfg.sparsity),
    "router_penalty": cfg.router_logit_penalty * task.router_logits.pow(2).mean(),
}
kappa = cfg.distill_weight
loss = ((1 - kappa) * terms["ce"] + kappa * (terms["distill_teacher"] + terms["distill_pre"])
        + terms["sparsity_penalty"] + terms["router_penalty"])
cpu = torch.device("cpu")
out = smat.meta_train_step(model, xs, ys, xq, yq, n_way, train.episode_generator(cfg.seed, 0, cpu))
print({name: round(t.item(), 5) for name, t in terms.items()})
print(f"L_i assembled here {loss.item():.6f}, meta_train_step {out.loss.item():.6f}")
assert torch.equal(loss, out.loss)  # bit for bit

# %% [markdown]
# **Where each term sends its gradient.** `tests/test_smat.py` holds the method to this
# (`GRADIENT_REACHES`, `test_each_loss_term_sends_gradient_to_exactly_its_tensors`): CE and both KD terms
# reach δ, $\log\alpha$ and the router (through $\theta_i$: $\partial\theta_i/\partial z_m = w_m\delta$,
# $\partial\theta_i/\partial w_m = z_m \odot \delta$); $L_{sp}$ reaches only $\log\alpha$ (through
# $\hat E_m$; $w$ and λ enter stopped); the logit penalty only the router; $\theta^{pre}$ is a buffer
# that nothing reaches. Here is the same computation, `torch.autograd.grad` of each term with respect to
# every trainable tensor, at the start:

# %%
def reached(terms: dict) -> None:
    """For each loss term, the trainable tensors its gradient reaches (non-zero), router tensors pooled."""
    names, params = zip(*model.named_parameters())
    lines = []
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        hit = {"router" if n.startswith("router.") else n
               for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        lines.append(f"{name:17} -> {', '.join(sorted(hit)) or 'nothing'}")
    print("\n".join(lines))


reached(terms)
print("θ_pre is trainable:", model.theta_pre.requires_grad)

# %% [markdown]
# At the start two arrows are silent, for the reasons of section 4: δ = 0 makes
# $\partial\theta_i/\partial z_m$ and $\partial\theta_i/\partial w_m$ zero, so the task loss reaches only
# δ, and λ = 0 makes $L_{sp}$ zero. The first meta-update therefore moves δ (and the router through its
# logit penalty); from then on every arrow of the test carries signal, as section 9 shows.
#
# **Dual ascent** [M3.9] (`dual_ascent`, §6, applied by `MetaOptimizer.step`, §8): after each
# meta-batch the multipliers climb by the weighted violation, and reset to zero once the constraint holds:
#
# $$\lambda_m \leftarrow \begin{cases} 0 & \hat s_m \ge \tau \\ \lambda_m + \eta_\lambda\, \overline{w_m(\tau - \hat s_m)} & \text{otherwise.}\end{cases}$$
#
# One step, as if this task were the whole meta-batch ($\eta_\lambda$ = 0.1; `meta_train_step` returns
# the task's $w \odot (\tau - \hat s)$ as `violation`):

# %%
stepped = smat.dual_ascent(model.multipliers, out.violation, out.hard_sparsity, cfg.sparsity,
                           cfg.multiplier_lr)
print("ŝ_m (test gates):", np.round(out.hard_sparsity.tolist(), 3), "below τ =", cfg.sparsity)
print("λ before:", model.multipliers.tolist())
print("λ after :", np.round(stepped.tolist(), 4), "= η_λ · w_m · (τ - ŝ_m)")

# %% [markdown]
# ## 8. Training: the first 200 episodes of the default run
#
# The loop of `train.meta_train`, its method lines only: for each task of a meta-batch of 4,
# `meta_train_step` and the backward of $L_i / 4$; then `meta_update` (§8, [M3.11]): SGD with momentum
# on δ, SGD with a huge step and clipping on $\log\alpha$ (clamped to $\pm\log 100$), AdamW on the
# router, dual ascent on λ, all at the default run's schedule (`train.lr_scale`: warm-up, then cosine
# over its 800 episodes). The episodes and every random draw are the default run's, so this is its
# first quarter exactly: the model it ends with equals, tensor for tensor, the checkpoint of
# `OMP_NUM_THREADS=1 python train.py --stop-after 200 --workers 0` (checked on the 2-core CPU sandbox,
# 2026-12-06; `README.md` says how other thread counts differ).

# %%
optimizer, protocol = smat.MetaOptimizer(model), data.protocol(cfg, "train")
total_steps, history = cfg.episodes // cfg.meta_batch, []
for step in range(200 // cfg.meta_batch):
    outputs = []
    for index in range(step * cfg.meta_batch, (step + 1) * cfg.meta_batch):
        e = data.training_episode(sources, protocol, cfg.seed, index, cfg.image_size)
        model.tasks_seen.fill_(index)  # drives T_r
        o = smat.meta_train_step(model, e.support_images, e.support_labels, e.query_images, e.query_labels,
                                 e.n_way, train.episode_generator(cfg.seed, index, cpu))
        (o.loss / cfg.meta_batch).backward()
        outputs.append(o)
    lr_scale = train.lr_scale(step, total_steps, cfg.warmup_fraction)
    batch = smat.meta_update(model, optimizer, outputs, lr_scale)
    model.tasks_seen.fill_((step + 1) * cfg.meta_batch)
    history.append({**{k: 100 * v.item() if k in PERCENT_FIELDS else v.item() for k, v in batch.stats.items()},
                    "entropy": router_entropy(batch.weights).item(), "sparsity": batch.sparsity.tolist(),
                    "multipliers": model.multipliers.tolist(),
                    "temperature": smat.router_temperature(cfg, model.tasks_seen).item()})
last = history[-1]
print({k: round(v, 3) for k, v in last.items() if not isinstance(v, list)})
print(f"ŝ mean ± std {np.mean(last['sparsity']):.3f} ± {np.std(last['sparsity']):.3f}, "
      f"mean λ {np.mean(last['multipliers']):.2f}")

# %% [markdown]
# The curves, against tasks seen (each point one meta-batch of 4 tasks; the accuracies are a running
# mean over 5 meta-batches):

# %%
episodes = cfg.meta_batch * np.arange(1, len(history) + 1)
series = {key: np.array([h[key] for h in history]) for key in history[0]}
figure, axes = plt.subplots(2, 2, figsize=(10, 5.6))
for key, label in [("accuracy", "student"), ("pretrained_accuracy", "frozen model"),
                   ("teacher_accuracy", "teacher")]:
    axes[0, 0].plot(episodes[4:], np.convolve(series[key], np.ones(5) / 5, mode="valid"), label=label)
axes[0, 0].set(title="query accuracy % (training tasks)")
axes[0, 1].plot(episodes, series["entropy"], label="H(w)")
axes[0, 1].axhline(np.log(cfg.n_experts), color="grey", linestyle=":", label="log M")
axes[0, 1].set(title="router entropy H(w) (nats), and T_r (dashed, right axis)")
axes[0, 1].twinx().plot(episodes, series["temperature"], color="black", linestyle="--", linewidth=1)
axes[1, 0].plot(episodes, series["sparsity"], linewidth=1)
axes[1, 0].axhline(cfg.sparsity, color="red", linestyle=":", label="τ")
axes[1, 0].set(title="ŝ_m per expert (test gates)", ylim=(0, 1), xlabel="tasks seen")
axes[1, 1].plot(episodes, series["multipliers"], linewidth=1)
axes[1, 1].set(title="λ_m per expert", xlabel="tasks seen")
for ax in axes.flat[:3]:
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What to read in them: while every expert is denser than τ, each λ_m climbs (faster for the experts the
# router weighs more), and the growing penalty drives $\log\alpha$ down, so the sparsity climbs towards
# τ. 200 episodes are a quarter of the run: `docs/metrics.md` shows the default run going on, the
# sparsity reaching τ = 0.9 by episode 600 and λ falling back towards 0 once the constraint holds (its
# episode-200 row can be set beside the last line printed above). The entropy is still near $\log M$ at
# $T_r = 2.75$; in the default run it falls to about 1.65 nats by episodes 400-600, once $T_r$ has
# reached 0.5, as the router learns to prefer experts.
#
# ## 9. The same task after 200 episodes
#
# Meta-testing [M5.1] (`task_model` and `predict`, §7) uses the router without noise and the test
# gates $\hat z$; no inner step, no teacher. Now δ ≠ 0, so $\theta_i$ differs from $\theta^{pre}$
# wherever the merged mask is non-zero. (This task was in the first meta-batch, so its accuracy below
# shows the mechanism, not a test result: the ID/OOD test table is `train.py`'s final step.)

# %%
w_now, _ = model.router(pre_prototypes, smat.router_temperature(cfg, model.tasks_seen))
mask_now = smat.merge_masks(w_now.detach(), smat.eval_gates(model.log_alpha.detach()))
theta_now, _ = smat.task_model(model, xs, ys, n_way)
print("w:", np.round(w_now.tolist(), 3))
print(f"touched (merged mask ≠ 0): {(mask_now != 0).float().mean():.3f} of P; "
      f"θ_i ≠ θ_pre on {(theta_now != model.theta_pre).float().mean():.3f} of P")
for name, pretrained in [("frozen model (Pre)", True), ("SMAT after 200 episodes", False)]:
    logits_now = smat.predict(model, xs, ys, xq, n_way, pretrained).logits
    print(f"{name}: zero-shot accuracy on this task's queries {accuracy(logits_now, yq):.1f} %")

# %% [markdown]
# Each expert now keeps 60-80 % of the backbone (its $\hat s_m$ is about 0.2-0.4), and eight of them
# together still cover almost all of it. Where they drop parameters first is not uniform: by block and
# module type, the embeddings and the LayerNorms lose the most so far. The full default run ends with
# every expert at $\hat s_m = 0.9$ and one task touching 32 % of the backbone (`README.md`).

# %%
by_module((smat.eval_gates(model.log_alpha.detach()) > 0).float())
plt.title("kept fraction of the test gates, mean over experts")
plt.show()

# %% [markdown]
# And the gradient routing again, on the same task, now off the start (δ ≠ 0, λ > 0): every arrow of
# `GRADIENT_REACHES` carries signal. `meta_train_step` returns the total only, so the terms are the
# section 5-7 pieces recomputed at the trained model (and checked against its loss):

# %%
generator = train.episode_generator(cfg.seed, 0, cpu)
task = model.task_parameters(pre_prototypes, generator)
support_features = model.features(task.theta, xs)
theta1, prototypes1 = smat.inner_step(task.theta, smat.class_prototypes(support_features, ys, n_way),
                                      support_features, ys, cfg)
query_logits = smat.cosine_logits(model.features(theta1, xq), prototypes1, cfg.cosine_scale)
ce = F.cross_entropy(query_logits, yq)
teacher_logits = smat.dense_teacher(model.features, theta1, prototypes1, xq, yq, cfg, ce)
T, direction = cfg.distill_temperature, cfg.distill_direction
terms = {
    "ce": ce,
    "distill_teacher": smat.distillation(query_logits, teacher_logits, T, direction),
    "distill_pre": smat.distillation(query_logits, pre_logits, T, direction),
    "sparsity_penalty": smat.sparsity_penalty(task.weights, model.multipliers,
                                              smat.expected_density(model.log_alpha), cfg.sparsity),
    "router_penalty": cfg.router_logit_penalty * task.router_logits.pow(2).mean(),
}
loss = ((1 - kappa) * terms["ce"] + kappa * (terms["distill_teacher"] + terms["distill_pre"])
        + terms["sparsity_penalty"] + terms["router_penalty"])
assert torch.equal(loss, smat.meta_train_step(model, xs, ys, xq, yq, n_way,
                                             train.episode_generator(cfg.seed, 0, cpu)).loss)
reached(terms)

# %% [markdown]
# From here, `smat.py` §7 `meta_train_step` is the same sequence in one screen, and `train.py`'s
# `meta_train` the same loop with validation, checkpoints and the final ID/OOD test around it.
