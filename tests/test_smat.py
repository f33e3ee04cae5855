"""The SMAT method core (smat.py): each part pinned against a closed form, an oracle or a property."""

import dataclasses
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import smat
from smat import Config, SMAT

# --- helpers ------------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """A two-layer feature extractor on 3×8×8 images: fast, and enough to exercise the method."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.feature_dim = dim
        self.fc1 = nn.Linear(3 * 8 * 8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(images.flatten(1)))))


def make_model(seed: int = 0, **overrides) -> SMAT:
    torch.manual_seed(seed)
    cfg = Config.pmf(**overrides) if overrides.pop("pmf", False) else Config(**{"n_experts": 4, **overrides})
    return SMAT(TinyBackbone(), cfg)


def make_episode(seed: int, n_way: int = 5, shots: int = 2, queries: int = 3):
    """A learnable synthetic episode: each class is a random template plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(n_way, 3, 8, 8, generator=g)

    def draw(per_class):
        labels = torch.arange(n_way).repeat(per_class)
        return templates[labels] + 0.8 * torch.randn(len(labels), 3, 8, 8, generator=g), labels

    (xs, ys), (xq, yq) = draw(shots), draw(queries)
    return xs, ys, xq, yq, n_way


# --- § 2 hard-concrete gates ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 6.0))
def test_sampled_gates_lie_in_the_unit_interval(seed, scale):
    log_alpha = torch.randn(3, 500, generator=torch.Generator().manual_seed(seed)) * scale

    z = smat.sample_gates(log_alpha, torch.Generator().manual_seed(seed))

    assert z.min() >= 0 and z.max() <= 1


def test_sampling_with_moderate_log_alpha_gives_exact_zeros_and_exact_ones():
    z = smat.sample_gates(torch.zeros(1, 10_000), torch.Generator().manual_seed(0))

    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


@settings(max_examples=30, deadline=None)
@given(value=st.floats(-6.0, 6.0))
def test_eval_gate_equals_the_closed_form(value):
    expected = min(1.0, max(0.0, 1.2 / (1 + math.exp(-value)) - 0.1))

    z = smat.eval_gates(torch.full((1, 1), value, dtype=torch.float64))

    assert z.item() == pytest.approx(expected, abs=1e-12)


def test_official_train_gate_is_noise_free_with_beta_two_thirds():
    log_alpha = torch.tensor([[1.6, -1.6, 0.0]])

    train, test = smat.official_train_gates(log_alpha), smat.eval_gates(log_alpha)

    assert train[0, 0] == 1.0 and train[0, 1] == 0.0  # the spec's numbers: 1.0 / 0.898 and 0 / 0.102
    assert test[0, 0].item() == pytest.approx(0.898, abs=1e-3) and test[0, 1].item() == pytest.approx(0.102, abs=1e-3)


@settings(max_examples=15, deadline=None)
@given(value=st.floats(-3.0, 3.0))
def test_expected_density_matches_the_monte_carlo_frequency_of_nonzero_gates(value):
    log_alpha = torch.full((1, 200_000), value)

    frequency = (smat.sample_gates(log_alpha, torch.Generator().manual_seed(1)) > 0).float().mean()

    assert smat.expected_density(log_alpha).item() == pytest.approx(frequency.item(), abs=5e-3)


def test_expected_density_increases_with_log_alpha():
    density = smat.expected_density(torch.linspace(-5, 5, 50)[:, None])

    assert (density.diff() > 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 8.0))
def test_eval_sparsity_counts_the_exact_zeros_of_the_eval_gates(seed, scale):
    log_alpha = torch.randn(3, 400, generator=torch.Generator().manual_seed(seed)) * scale

    assert torch.equal(smat.eval_sparsity(log_alpha), smat.hard_sparsity(smat.eval_gates(log_alpha)))


def test_the_largest_reachable_sparsity_of_sampled_gates_is_what_samples_at_the_bound_reach():
    cfg = Config(constraint_gates="sampled", sparsity=0.5)
    at_bound = torch.full((1, 400_000), -cfg.log_alpha_bound)

    sampled = smat.hard_sparsity(smat.sample_gates(at_bound, torch.Generator().manual_seed(0))).item()

    assert smat.max_sparsity(cfg) == pytest.approx(0.9529, abs=1e-4)
    assert sampled == pytest.approx(smat.max_sparsity(cfg), abs=2e-3)
    assert smat.max_sparsity(Config(constraint_gates="test")) == 1.0
    assert smat.max_sparsity(Config(constraint_gates="sampled", mask_sampling="official")) == 1.0


@pytest.mark.parametrize("values", [dict(constraint_gates="sampled", sparsity=0.96),
                                    dict(constraint_gates="test", sparsity=0.5, log_alpha_bound=2.0)])
def test_a_sparsity_the_gates_cannot_reach_is_refused_in_one_line(values):
    with pytest.raises(smat.ConfigError, match="cannot be reached") as error:
        Config(**values)
    assert len(str(error.value).splitlines()) == 1


def test_pmf_has_no_masks_so_any_sparsity_value_is_accepted():
    assert Config.pmf(sparsity=0.99).sparsity == 0.99


# --- § 3 sparse interpolated experts -------------------------------------------------------------


def random_pool(seed: int, n_experts: int = 3):
    g = torch.Generator().manual_seed(seed)
    model = make_model(seed, n_experts=n_experts)
    delta = torch.randn(model.layout.n_params, generator=g)
    gates = (torch.rand(n_experts, model.layout.n_params, generator=g) > 0.5).float()
    weights = torch.rand(n_experts, generator=g)
    return model, delta, gates, weights / weights.sum()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000))
def test_zero_delta_gives_the_pretrained_weights_for_any_masks_and_weights(seed):
    model, delta, gates, weights = random_pool(seed)

    theta = smat.interpolate(model.theta_pre, torch.zeros_like(delta), smat.merge_masks(weights, gates))

    assert torch.equal(theta, model.theta_pre)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), expert=st.integers(0, 2))
def test_one_hot_weights_with_all_one_masks_give_pretrained_plus_delta(seed, expert):
    model, delta, gates, _ = random_pool(seed)
    gates[expert] = 1.0

    theta = smat.interpolate(model.theta_pre, delta, smat.merge_masks(F.one_hot(torch.tensor(expert), 3).float(), gates))

    torch.testing.assert_close(theta, model.theta_pre + delta)


def test_all_zero_masks_give_the_pretrained_weights():
    model, delta, _, weights = random_pool(0)

    theta = smat.interpolate(model.theta_pre, delta, smat.merge_masks(weights, torch.zeros(3, len(delta))))

    assert torch.equal(theta, model.theta_pre)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_the_update_is_linear_in_the_merging_weights(seed, a, b):
    model, delta, gates, w1 = random_pool(seed)
    w2 = torch.rand(3)

    def update(w):
        return smat.interpolate(model.theta_pre, delta, smat.merge_masks(w, gates)) - model.theta_pre

    torch.testing.assert_close(update(a * w1 + b * w2), a * update(w1) + b * update(w2), atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_interpolation_equals_a_slow_loop_over_experts_and_parameter_tensors(seed):
    model, delta, gates, weights = random_pool(seed)
    backbone = TinyBackbone()
    torch.manual_seed(seed)
    deltas = model.layout.unflatten(delta)
    masks = [model.layout.unflatten(gates[m]) for m in range(3)]

    theta = model.layout.unflatten(smat.interpolate(model.theta_pre, delta, smat.merge_masks(weights, gates)))

    for name, pre in zip(model.layout.names, model.layout.unflatten(model.theta_pre).values()):
        expected = pre.clone()
        for m in range(3):  # θ[k] = θ_pre[k] + Σ_m w_m z_m[k] ⊙ δ[k], one tensor and one expert at a time
            expected = expected + weights[m] * masks[m][name] * deltas[name]
        torch.testing.assert_close(theta[name], expected)
    assert list(theta) == [name for name, _ in backbone.named_parameters()]


def test_features_through_the_flat_vector_equal_the_original_backbone():
    torch.manual_seed(3)
    backbone = TinyBackbone()
    images = torch.randn(4, 3, 8, 8)
    expected = backbone(images)

    model = SMAT(backbone, Config(n_experts=2))

    torch.testing.assert_close(model.features(model.theta_pre, images), expected)


# --- § 4 router ------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n_way=st.integers(2, 9), sample=st.booleans())
def test_router_weights_are_nonnegative_and_sum_to_one(seed, n_way, sample):
    model = make_model(seed)
    generator = torch.Generator().manual_seed(seed) if sample else None

    weights, logits = model.router(torch.randn(n_way, 16), torch.tensor(0.5), generator)

    assert (weights >= 0).all() and weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert logits.shape == (4,)


def test_router_temperature_follows_the_official_schedule():
    cfg = Config.paper()
    for n in [0, 2_000, 10_000, 18_000, 40_000]:
        temperature = smat.router_temperature(cfg, torch.tensor(n))

        assert temperature.item() == pytest.approx(max(0.5, 5 - n / 4000))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(0.01, 100.0))
def test_the_spectral_linear_forward_divides_the_weight_by_its_largest_singular_value(seed, scale):
    torch.manual_seed(seed)
    layer = smat._SpectralLinear(6, 9)
    with torch.no_grad():
        layer.weight.mul_(scale)
    x = torch.randn(4, 6)

    expected = F.linear(x, layer.weight / torch.linalg.matrix_norm(layer.weight, ord=2), layer.bias)

    torch.testing.assert_close(layer(x), expected)
    effective = layer.weight / torch.linalg.svdvals(layer.weight)[0]  # a second oracle: the SVD
    torch.testing.assert_close(layer(x), F.linear(x, effective, layer.bias))


def test_the_router_block_equals_torchs_pre_norm_transformer_encoder_layer_with_the_same_weights():
    """Router.embed is one pre-LN block (no dropout, exact GELU, LayerNorm eps 1e-5) over [P; S], read at
    position 0: nn.TransformerEncoderLayer(norm_first=True) computes the same with the same weights."""
    cfg = Config(n_experts=4, router_spectral_norm=False)
    torch.manual_seed(0)
    router, dim = smat.Router(16, cfg), 16
    reference = nn.TransformerEncoderLayer(dim, cfg.router_heads, dim_feedforward=int(dim * cfg.router_mlp_ratio),
                                           dropout=0.0, activation="gelu", layer_norm_eps=1e-5, batch_first=True,
                                           norm_first=True).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(router.qkv.weight)
        reference.self_attn.in_proj_bias.zero_()  # the router's q, k, v projection has no bias
        reference.self_attn.out_proj.load_state_dict(router.proj.state_dict())
        reference.linear1.load_state_dict(router.fc1.state_dict())
        reference.linear2.load_state_dict(router.fc2.state_dict())
        for norm in (router.norm1, router.norm2):  # non-trivial affine parameters, so their use is checked
            norm.weight.normal_(1.0, 0.1), norm.bias.normal_(0.0, 0.1)
        reference.norm1.load_state_dict(router.norm1.state_dict())
        reference.norm2.load_state_dict(router.norm2.state_dict())
    prototypes = torch.randn(5, dim)

    expected = reference(torch.cat([prototypes, router.tokens])[None])[0, 0]

    torch.testing.assert_close(router.embed(prototypes), expected, rtol=1e-5, atol=1e-5)


# --- § 5 prototypes, cosine head and the inner step ----------------------------------------------


def test_prototypes_are_class_means():
    features, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

    prototypes = smat.class_prototypes(features, labels, 3)

    torch.testing.assert_close(prototypes[1], features[[1, 4]].mean(0))


def test_inner_step_equals_manual_sgd_on_a_linear_model():
    torch.manual_seed(0)
    cfg = Config(inner_lr=0.1)
    linear = nn.Linear(5, 4)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    theta = torch.cat([linear.weight.reshape(-1), linear.bias]).requires_grad_()

    def features(t):
        return F.linear(x, t[:20].view(4, 5), t[20:])

    prototypes = smat.class_prototypes(features(theta), y, 3)
    new_theta, new_prototypes = smat.inner_step(theta, prototypes, features(theta), y, cfg)

    reference = nn.Linear(5, 4)
    reference.load_state_dict(linear.state_dict())
    head = nn.Parameter(prototypes.detach().clone())
    loss = F.cross_entropy(smat.cosine_logits(reference(x), head, cfg.cosine_scale), y)
    optimizer = torch.optim.SGD([*reference.parameters(), head], lr=0.1)
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(new_theta, torch.cat([reference.weight.reshape(-1), reference.bias]))
    torch.testing.assert_close(new_prototypes, head.detach())


def test_adapted_prototypes_keep_the_gradient_path_to_the_support_features():
    torch.manual_seed(0)
    theta = torch.randn(24, requires_grad=True)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    features = x @ theta.view(4, 6)

    _, prototypes = smat.inner_step(theta, smat.class_prototypes(features, y, 3), features, y, Config())
    (grad,) = torch.autograd.grad(prototypes.sum(), theta)

    assert grad.abs().sum() > 0


# --- § 6 teacher, distillation and the sparsity constraint ---------------------------------------


def test_a_small_step_teacher_lowers_the_query_loss():
    model = make_model(0, teacher_lr=0.05, teacher_steps=3)
    xs, ys, xq, yq, n_way = make_episode(0)
    theta = model.theta_pre.clone()
    prototypes = smat.class_prototypes(model.features(theta, xs), ys, n_way)
    before = F.cross_entropy(smat.cosine_logits(model.features(theta, xq), prototypes, 10.0), yq)

    teacher_logits = smat.dense_teacher(model.features, theta, prototypes, xq, yq, model.cfg)

    assert F.cross_entropy(teacher_logits, yq) < before


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_distillation_is_zero_when_student_and_teacher_agree(direction):
    logits = torch.randn(7, 5)

    assert smat.distillation(logits, logits.clone(), 2.0, direction).item() == pytest.approx(0.0, abs=1e-6)


def test_reverse_distillation_is_kl_of_student_to_teacher():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    p, q = F.softmax(student / 2, -1), F.softmax(teacher / 2, -1)

    value = smat.distillation(student, teacher, 2.0, "reverse")

    torch.testing.assert_close(value, 2.0 * (p * (p / q).log()).sum(-1).mean())


def test_a_multiplier_grows_while_its_expert_is_too_dense_and_resets_once_sparse_enough():
    multipliers = torch.tensor([0.5, 0.5])
    sparsity = torch.tensor([0.2, 0.95])  # expert 0 violates ŝ ≥ 0.9, expert 1 satisfies it
    weights = torch.tensor([0.6, 0.4])

    updated = smat.dual_ascent(multipliers, weights * (0.9 - sparsity), sparsity, 0.9, lr=0.1)

    assert updated[0] > multipliers[0] and updated[1] == 0.0


def test_the_primal_sparsity_term_pushes_expected_density_down():
    log_alpha = torch.zeros(2, 100, requires_grad=True)
    multipliers, weights = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])

    smat.sparsity_penalty(weights, multipliers, smat.expected_density(log_alpha), 0.9).backward()
    with torch.no_grad():
        stepped = log_alpha - 100.0 * log_alpha.grad

    assert (smat.expected_density(stepped) < smat.expected_density(log_alpha.detach())).all()


# --- § 7 the step: which parameters learn, and end to end ---------------------------------------


def test_exactly_the_trainable_tensors_receive_gradients_and_the_backbone_none():
    model = make_model(0)
    with torch.no_grad():  # leave the δ = 0, λ = 0 start so every path carries a signal
        model.delta.normal_()
        model.multipliers.fill_(1.0)
    xs, ys, xq, yq, n_way = make_episode(0)

    smat.meta_train_step(model, xs, ys, xq, yq, n_way, torch.Generator().manual_seed(0)).loss.backward()

    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    router = {f"router.{name}" for name, _ in model.router.named_parameters()}
    assert with_grad == {"delta", "log_alpha"} | router
    assert not model.theta_pre.requires_grad and "theta_pre" not in dict(model.named_parameters())


def loss_terms_by_hand(model: SMAT, episode, seed: int) -> tuple[dict, dict]:
    """Every term of one task's loss [M3.4-3.10], written out with plain torch ops from the model's
    tensors (the backbone through model.features, the router block through Router.embed: both pinned
    above), for noise-free gates (mask_sampling "official") and one teacher step. Returns (terms,
    intermediates): the loss is (1-κ)·ce + κ·(distill_teacher + distill_pre) + sparsity_penalty +
    router_penalty."""
    cfg, (xs, ys, xq, yq, n_way) = model.cfg, episode
    assert cfg.mask_sampling == "official" and cfg.teacher_steps == 1 and cfg.inner_step and cfg.kl_to_pretrained

    def logits(features, prototypes):  # 10·cos
        return cfg.cosine_scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T

    def class_means(features, labels):
        return torch.stack([features[labels == c].mean(0) for c in range(n_way)])

    def kl_student_teacher(student, teacher):  # (T²/2)·KL(p_s ‖ p_t) at temperature T, mean over queries
        log_s, log_t = (F.log_softmax(x / cfg.distill_temperature, -1) for x in (student, teacher))
        return cfg.distill_temperature**2 / 2 * (log_s.exp() * (log_s - log_t)).sum(-1).mean()

    with torch.no_grad():  # the frozen model: prototypes for the router, query logits for the extra KL
        pre_prototypes = class_means(model.features(model.theta_pre, xs), ys)
        pre_logits = logits(model.features(model.theta_pre, xq), pre_prototypes)
    # router: a = K e, w_m = s_m / Σ s, s = σ((a + log u - log(1-u)) / T_r), u from the task's generator
    a = model.router.keys @ model.router.embed(pre_prototypes)
    u = torch.rand(cfg.n_experts, generator=torch.Generator().manual_seed(seed)).clamp(1e-6, 1 - 1e-6)
    t_r = max(cfg.router_temperature_end, cfg.router_temperature_start - (cfg.router_temperature_start
              - cfg.router_temperature_end) * model.tasks_seen.item() / round(cfg.router_anneal_fraction * cfg.episodes))
    scores = torch.sigmoid((a + u.log() - (1 - u).log()) / t_r)
    w = scores / (scores.sum() + 1e-8)
    z = (torch.sigmoid(model.log_alpha / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)  # β = 2/3, (γ, ζ) = (-0.1, 1.1)
    theta = model.theta_pre + (w @ z) * model.delta
    # prototype head, then one first-order GD step on the support loss over θ and a detached head
    prototypes = class_means(model.features(theta, xs), ys)
    head = prototypes.detach().requires_grad_()
    support_loss = F.cross_entropy(logits(model.features(theta, xs), head), ys)
    g_theta, g_head = torch.autograd.grad(support_loss, [theta, head])
    theta1, prototypes1 = theta - cfg.inner_lr * g_theta, prototypes - cfg.inner_lr * g_head
    student = logits(model.features(theta1, xq), prototypes1)
    # the dense teacher: one GD step on the query loss from sg(θ'), sg(W')
    theta_t, head_t = theta1.detach().requires_grad_(), prototypes1.detach().requires_grad_()
    g_theta_t, g_head_t = torch.autograd.grad(F.cross_entropy(logits(model.features(theta_t, xq), head_t), yq),
                                              [theta_t, head_t])
    with torch.no_grad():
        teacher = logits(model.features(theta_t - cfg.teacher_lr * g_theta_t, xq), head_t - cfg.teacher_lr * g_head_t)
    density = torch.sigmoid(model.log_alpha + (2 / 3) * math.log(1.1 / 0.1)).mean(1)  # P(z ≠ 0), mean over P
    terms = {"ce": F.cross_entropy(student, yq), "distill_teacher": kl_student_teacher(student, teacher),
             "distill_pre": kl_student_teacher(student, pre_logits),
             "sparsity_penalty": (w.detach() * model.multipliers * (density - (1 - cfg.sparsity))).sum(),
             "router_penalty": cfg.router_logit_penalty * a.pow(2).mean()}
    return terms, {"student": student, "teacher": teacher, "pre_logits": pre_logits}


def oracle_model() -> SMAT:
    model = make_model(0, n_experts=3, mask_sampling="official")
    with torch.no_grad():  # off the δ = 0, λ = 0 start, so that every term is non-zero
        model.delta.normal_(0.0, 0.1)
        model.multipliers.copy_(torch.tensor([0.5, 1.0, 2.0]))
        model.tasks_seen.fill_(100)
    return model


def test_the_total_loss_equals_its_terms_computed_by_hand():
    model, episode = oracle_model(), make_episode(0)
    terms, _ = loss_terms_by_hand(model, episode, seed=5)
    kappa = model.cfg.distill_weight

    out = smat.meta_train_step(model, *episode, torch.Generator().manual_seed(5))

    expected = ((1 - kappa) * terms["ce"] + kappa * (terms["distill_teacher"] + terms["distill_pre"])
                + terms["sparsity_penalty"] + terms["router_penalty"])
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)  # measured: equal to the last bit
    assert all(term.abs() > 1e-5 for term in terms.values())  # each term is above the tolerance


@pytest.mark.parametrize("teacher, kl_to_pretrained", [(False, True), (True, False), (False, False)])
def test_each_ablation_switch_removes_exactly_its_own_distillation_term(teacher, kl_to_pretrained):
    # the terms by hand come from the full model; the switched-off model has the same tensors and draws
    model, episode = oracle_model(), make_episode(0)
    terms, _ = loss_terms_by_hand(model, episode, seed=5)
    switched = SMAT(TinyBackbone(), dataclasses.replace(model.cfg, teacher=teacher, kl_to_pretrained=kl_to_pretrained))
    switched.load_state_dict(model.state_dict())
    kappa = model.cfg.distill_weight

    out = smat.meta_train_step(switched, *episode, torch.Generator().manual_seed(5))

    kept = [terms[name] for name, on in (("distill_teacher", teacher), ("distill_pre", kl_to_pretrained)) if on]
    ce_part = (1 - kappa) * terms["ce"] + kappa * sum(kept) if kept else terms["ce"]  # κ weighs KD terms only
    torch.testing.assert_close(out.loss, ce_part + terms["sparsity_penalty"] + terms["router_penalty"],
                               rtol=0, atol=1e-6)
    assert ("teacher_lead" in out.terms) == teacher


ROUTER = "router.*"
GRADIENT_REACHES = {  # loss term -> the parameters it sends gradient to (ROUTER: every router tensor)
    "ce": {"delta", "log_alpha", ROUTER},
    "distill_teacher": {"delta", "log_alpha", ROUTER},
    "distill_pre": {"delta", "log_alpha", ROUTER},
    "sparsity_penalty": {"log_alpha"},  # w and λ enter stopped: only the expected density has a gradient
    "router_penalty": {ROUTER},
}


@pytest.mark.parametrize("term", list(GRADIENT_REACHES))
def test_each_loss_term_sends_gradient_to_exactly_its_tensors(term):
    model = oracle_model()
    terms, _ = loss_terms_by_hand(model, make_episode(0), seed=5)
    names = [name for name, _ in model.named_parameters()]

    grads = torch.autograd.grad(terms[term], [p for _, p in model.named_parameters()], allow_unused=True)

    reached = {name for name, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
    router = {name for name in names if name.startswith("router.")}
    expected = {name for name in GRADIENT_REACHES[term] - {ROUTER}} | (router if ROUTER in GRADIENT_REACHES[term] else set())
    assert reached == expected
    assert not model.theta_pre.requires_grad  # θ_pre is a buffer: no term can reach it


def test_distillation_never_sends_gradient_to_the_teacher_or_the_frozen_model():
    model = oracle_model()
    _, parts = loss_terms_by_hand(model, make_episode(0), seed=5)
    student = parts["student"].detach().requires_grad_()
    teacher, pre = parts["teacher"].clone().requires_grad_(), parts["pre_logits"].clone().requires_grad_()

    loss = smat.distillation(student, teacher, 2.0) + smat.distillation(student, pre, 2.0)
    grads = torch.autograd.grad(loss, [student, teacher, pre], allow_unused=True)

    assert grads[0].abs().sum() > 0 and grads[1] is None and grads[2] is None
    xs, ys, xq, yq, n_way = make_episode(0)
    theta = model.theta_pre.clone().requires_grad_()
    prototypes = smat.class_prototypes(model.features(theta, xs), ys, n_way)
    assert not smat.dense_teacher(model.features, theta, prototypes, xq, yq, model.cfg).requires_grad


def test_delta_gets_no_gradient_where_the_merged_mask_is_zero():
    model = make_model(0, inner_step=False, teacher=False, mask_sampling="official")
    with torch.no_grad():  # noise-free gates: log α at the lower bound is exactly off
        model.delta.normal_()
        model.log_alpha[:, ::2] = -model.cfg.log_alpha_bound  # every expert off on even positions
    xs, ys, xq, yq, n_way = make_episode(0)

    smat.meta_train_step(model, xs, ys, xq, yq, n_way, torch.Generator().manual_seed(0)).loss.backward()

    assert model.delta.grad[::2].abs().max() == 0 and model.delta.grad[1::2].abs().sum() > 0


def test_pmf_trains_only_the_dense_delta():
    model = make_model(0, pmf=True)
    xs, ys, xq, yq, n_way = make_episode(0)

    smat.meta_train_step(model, xs, ys, xq, yq, n_way, torch.Generator().manual_seed(0)).loss.backward()

    assert [name for name, _ in model.named_parameters()] == ["delta"] and model.delta.grad.abs().sum() > 0


def test_a_task_is_a_pure_function_of_its_data_and_seed():
    xs, ys, xq, yq, n_way = make_episode(0)
    model = make_model(0)

    first = smat.meta_train_step(model, xs, ys, xq, yq, n_way, torch.Generator().manual_seed(7))
    second = smat.meta_train_step(model, xs, ys, xq, yq, n_way, torch.Generator().manual_seed(7))

    assert torch.equal(first.loss, second.loss) and torch.equal(first.weights, second.weights)


def test_pretrained_prediction_is_a_plain_protonet_on_the_frozen_backbone():
    torch.manual_seed(0)
    backbone = TinyBackbone()
    xs, ys, xq, _, n_way = make_episode(1)
    prototypes = smat.class_prototypes(backbone(xs), ys, n_way)
    expected = smat.cosine_logits(backbone(xq), prototypes, 10.0)

    prediction = smat.predict(SMAT(backbone, Config(n_experts=2)), xs, ys, xq, n_way, pretrained=True)

    torch.testing.assert_close(prediction.logits, expected)


def test_a_fresh_model_predicts_like_the_pretrained_backbone():
    model = make_model(0)
    xs, ys, xq, _, n_way = make_episode(2)

    zero_shot, pre = smat.predict(model, xs, ys, xq, n_way), smat.predict(model, xs, ys, xq, n_way, pretrained=True)

    torch.testing.assert_close(zero_shot.logits, pre.logits)  # δ = 0 at initialisation [M3.3]


def test_a_few_hundred_steps_lower_the_query_loss_and_move_sparsity_towards_the_target():
    # mask lr scaled to this tiny P (6.7 k parameters; the official 1e6 is for ViT-S's 21.7 M)
    model = make_model(0, sparsity=0.6, mask_lr=3000.0, multiplier_lr=1.0, delta_lr=0.05,
                       router_anneal_fraction=0.5)
    optimizer = smat.MetaOptimizer(model)

    def run(steps: int, start: int):
        losses, sparsities = [], []
        for step in range(start, start + steps):
            outputs = []
            for task in range(model.cfg.meta_batch):
                seed = 4 * step + task
                out = smat.meta_train_step(model, *make_episode(seed), torch.Generator().manual_seed(seed))
                (out.loss / model.cfg.meta_batch).backward()
                outputs.append(out)
            model.tasks_seen += model.cfg.meta_batch
            batch = smat.meta_update(model, optimizer, outputs, 1.0)
            losses.append(batch.stats["ce"])
            sparsities.append(batch.sparsity)
        return torch.stack(losses).mean(), torch.stack(sparsities).mean(0)

    loss_before, sparsity_before = run(10, 0)
    run(80, 10)
    loss_after, sparsity_after = run(10, 90)

    assert loss_after < 0.8 * loss_before  # measured: 0.537 -> 0.299
    assert (sparsity_before < 0.3).all() and ((sparsity_after - 0.6).abs() < 0.1).all()  # 0.0003 -> 0.65


# --- § 1 and § 8 configuration and meta-update ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, name", [({"sparsity": 1.0}, "sparsity"), ({"n_experts": 0}, "experts"), ({"episodes": 0}, "episodes")]
)
def test_out_of_range_configuration_names_the_field_and_the_valid_range(overrides, name):
    with pytest.raises(smat.ConfigError, match=rf"^{name} = .* it must be"):
        Config(**overrides)


def test_meta_update_clamps_log_alpha_to_its_bounds():
    model = make_model(0)
    model.log_alpha.grad = torch.randn_like(model.log_alpha)
    model.delta.grad = torch.zeros_like(model.delta)

    smat.MetaOptimizer(model).step(1.0, torch.zeros(4), torch.zeros(4))

    assert model.log_alpha.abs().max().item() == pytest.approx(model.cfg.log_alpha_bound)


def test_precomputed_eval_gates_give_the_same_prediction():
    model = make_model(0)
    with torch.no_grad():
        model.delta.normal_()
    xs, ys, xq, _, n_way = make_episode(3)

    cached = smat.predict(model, xs, ys, xq, n_way, gates=smat.eval_gates(model.log_alpha))

    torch.testing.assert_close(cached.logits, smat.predict(model, xs, ys, xq, n_way).logits)


def hand_built_outputs(sparsity: list[list[float]], weights: list[list[float]], tau: float) -> list[smat.StepOutput]:
    """StepOutputs of a meta-batch with chosen ŝ and w (the loss is not used by the meta-update)."""
    outputs = []
    for s, w in zip(sparsity, weights):
        s, w = torch.tensor(s), torch.tensor(w)
        outputs.append(smat.StepOutput(torch.zeros(()), {"ce": torch.tensor(1.0)}, w, s, w * (tau - s)))
    return outputs


def test_dual_ascent_grows_the_multiplier_of_a_too_dense_expert_and_resets_a_sparse_enough_one():
    model = make_model(0, n_experts=2, meta_batch=2, sparsity=0.9, multiplier_lr=0.1)
    model.multipliers.copy_(torch.tensor([0.5, 0.5]))
    # expert 0: ŝ = 0.2, 0.4 < τ (too dense); expert 1: ŝ = 0.95, 0.93 ≥ τ on average (sparse enough)
    outputs = hand_built_outputs([[0.2, 0.95], [0.4, 0.93]], [[0.6, 0.4], [0.3, 0.7]], tau=0.9)

    batch = smat.meta_update(model, smat.MetaOptimizer(model), outputs, lr_scale=1.0)

    violation = (0.6 * (0.9 - 0.2) + 0.3 * (0.9 - 0.4)) / 2  # mean_i w_i0 (τ - ŝ_i0) = 0.285
    assert model.multipliers[0].item() == pytest.approx(0.5 + 0.1 * violation)  # λ_0 grows by η_λ·violation
    assert model.multipliers[1].item() == 0.0  # mean ŝ_1 = 0.94 ≥ τ: the constraint holds, λ_1 resets
    assert batch.sparsity.tolist() == pytest.approx([0.3, 0.94])


def test_meta_update_stops_on_a_non_finite_loss_before_changing_any_parameter():
    model = make_model(0, n_experts=2, meta_batch=1)
    model.delta.grad = torch.ones_like(model.delta)
    outputs = hand_built_outputs([[0.2, 0.2]], [[0.5, 0.5]], tau=0.9)
    outputs[0].terms["ce"] = torch.tensor(float("nan"))
    before = model.delta.detach().clone()

    with pytest.raises(smat.NonFiniteLoss, match="non-finite ce"):
        smat.meta_update(model, smat.MetaOptimizer(model), outputs, lr_scale=1.0)

    assert torch.equal(model.delta, before) and model.multipliers.abs().sum() == 0


def record_grad_norm(norms: dict, name: str, optimizer: torch.optim.Optimizer, *_) -> None:
    norms[name] = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in optimizer.param_groups[0]["params"]]))


def test_each_parameter_group_has_its_optimiser_lr_weight_decay_momentum_and_clip():
    model = make_model(0)
    cfg, optimizer = model.cfg, smat.MetaOptimizer(model)
    router = list(model.router.parameters())
    expected = {  # name: (class, parameters, lr, weight decay, momentum, clip on the group's grad norm)
        "delta": (torch.optim.SGD, [model.delta], cfg.delta_lr, cfg.delta_weight_decay, cfg.delta_momentum, None),
        "mask": (torch.optim.SGD, [model.log_alpha], cfg.mask_lr, 0.0, 0.0, cfg.mask_clip),
        "router": (torch.optim.AdamW, router, cfg.router_lr, cfg.router_weight_decay, None, cfg.router_clip),
    }
    assert set(optimizer.optimizers) == set(expected)
    norms = {}
    for name, (cls, params, lr, decay, momentum, clip) in expected.items():
        opt = optimizer.optimizers[name]
        (group,) = opt.param_groups
        assert type(opt) is cls and [id(p) for p in group["params"]] == [id(p) for p in params]
        assert group["lr"] == lr and group["weight_decay"] == decay
        assert momentum is None or group["momentum"] == momentum
        opt.register_step_pre_hook(partial(record_grad_norm, norms, name))  # the grads the step will use
    for p in model.parameters():  # gradients far above every clip
        p.grad = torch.full_like(p, 100.0)

    optimizer.step(1.0, torch.zeros(cfg.n_experts), torch.zeros(cfg.n_experts))

    assert norms["mask"].item() == pytest.approx(cfg.mask_clip, rel=1e-5)  # clip_grad_norm_ leaves ~1e-6 below
    assert norms["router"].item() == pytest.approx(cfg.router_clip, rel=1e-5)
    assert norms["delta"].item() == pytest.approx(100.0 * model.delta.numel() ** 0.5)  # δ is not clipped
    # the defaults: the official set-up [official: SIE L737-760, trainer L119-122] but for the CPU profile's lrs
    assert (cfg.delta_momentum, cfg.delta_weight_decay, cfg.mask_lr, cfg.mask_clip, cfg.router_lr,
            cfg.router_weight_decay, cfg.router_clip) == (0.9, 1e-4, 1e6, 5.0, 1e-3, 1e-2, 1.0)



@pytest.mark.parametrize("episodes", [200, 800, 50_000])
def test_the_router_temperature_anneals_over_the_same_fraction_of_any_run(episodes):
    cfg = Config(episodes=episodes)
    at = lambda tasks: smat.router_temperature(cfg, torch.tensor(tasks)).item()  # noqa: E731

    assert at(0) == pytest.approx(cfg.router_temperature_start)
    assert at(episodes // 4) == pytest.approx((cfg.router_temperature_start + cfg.router_temperature_end) / 2)
    assert at(episodes // 2) == pytest.approx(cfg.router_temperature_end) == at(episodes)
    assert smat.anneal_tasks(Config.paper()) == 18_000  # the official max(0.5, 5 - n/4000) over 50k tasks


def test_smat_has_a_router_masks_and_the_constraint_and_pmf_has_none_of_them():
    smat_cfg, pmf_cfg = Config(), Config.pmf()

    assert (smat_cfg.has_router, smat_cfg.has_masks, smat_cfg.has_constraint, smat_cfg.teacher) == (True,) * 4
    assert (pmf_cfg.has_router, pmf_cfg.has_masks, pmf_cfg.has_constraint, pmf_cfg.teacher) == (False,) * 4
    smat_model, pmf_model = make_model(0), make_model(0, pmf=True)
    assert hasattr(smat_model, "router") and hasattr(smat_model, "log_alpha")
    assert not hasattr(pmf_model, "router") and not hasattr(pmf_model, "log_alpha")


# --- top-k routing, the worked example of docs/extending.md ---------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_routing_merges_exactly_k_experts_with_weights_summing_to_one(top_k):
    model = make_model(0, router_top_k=top_k)
    prototypes = torch.randn(5, model.feature_dim, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor(1.0)

    for generator in (None, torch.Generator().manual_seed(2)):  # test time and training
        weights, logits = model.router(prototypes, temperature, generator)

        assert (weights > 0).sum() == top_k and torch.isclose(weights.sum(), torch.tensor(1.0))
    kept = model.router(prototypes, temperature)[0].nonzero().flatten()
    assert set(kept.tolist()) == set(logits.topk(top_k).indices.tolist())  # the highest-scoring experts


def test_top_k_routing_with_k_equal_to_the_pool_is_the_soft_merge_and_sends_gradient_to_kept_experts():
    soft, full = make_model(0), make_model(0, router_top_k=4)  # 4 experts
    prototypes = torch.randn(5, soft.feature_dim, generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(full.router(prototypes, torch.tensor(1.0))[0], soft.router(prototypes, torch.tensor(1.0))[0])
    one = make_model(0, router_top_k=2)
    weights, _ = one.router(prototypes, torch.tensor(1.0))
    (grad,) = torch.autograd.grad(weights[weights > 0].max(), one.router.keys)
    assert (grad[weights == 0] == 0).all() and (grad[weights > 0] != 0).any()  # a dropped expert learns nothing here
