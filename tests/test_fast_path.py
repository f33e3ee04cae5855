"""The fast paths against the plain code they stand for: values and gradients must agree.

Fast paths: fused_merge.MergeExperts (Config.fused_merge: the merge θ = θ_pre + (w @ z) ⊙ δ as one op
whose backward keeps z, or on CUDA recomputes it; both paths are tested on CPU), expected_density's
recomputing backward, and the teacher's first gradient taken from the student's graph (dense_teacher's
`student_loss`). The plain path is the chain of public functions interpolate(merge_masks(w,
GATES[...](log α))) that training runs by default, the closed-form density, and a teacher that runs
its own forward pass. CUDA-only checks skip on CPU; the GPU session runs them through
benchmarks/gpu_check.sh.
"""

import math
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_smat import make_episode, make_model

import fused_merge
import smat

SAMPLINGS = ["stochastic", "official", "test"]
devices = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def plain_merge(theta_pre, delta, weights, log_alpha, sampling, generator):
    gates = smat.GATES[sampling][0](log_alpha, generator)
    return smat.interpolate(theta_pre, delta, smat.merge_masks(weights, gates)), gates.detach()


def fused(theta_pre, delta, weights, log_alpha, sampling, generator):
    """The fused merge as SMAT.task_parameters calls it."""
    return fused_merge.MergeExperts.apply(theta_pre, delta, weights, log_alpha, *smat.GATES[sampling],
                                          (smat.GAMMA, smat.ZETA), generator)


def merge_inputs(seed: int, scale: float, n_experts: int = 3, n_params: int = 400, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    theta_pre = torch.randn(n_params, generator=g)
    delta = torch.randn(n_params, generator=g)
    weights = torch.rand(n_experts, generator=g).softmax(0)
    log_alpha = torch.randn(n_experts, n_params, generator=g) * scale
    return [t.to(device) for t in (theta_pre, delta, weights)] + [log_alpha.to(device)]


def merge_and_grads(merge, inputs, sampling, seed, device="cpu", autocast=False):
    theta_pre, delta, weights, log_alpha = [t.clone().requires_grad_(i > 0) for i, t in enumerate(inputs)]
    generator = torch.Generator(device).manual_seed(seed)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):  # forward only, as in train.py
        theta, gates = merge(theta_pre, delta, weights, log_alpha, sampling, generator)
    cotangent = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    grads = torch.autograd.grad((theta * cotangent).sum(), [delta, weights, log_alpha])
    return theta.detach(), gates, grads, generator


# --- the fused merge -----------------------------------------------------------------------------


def test_training_runs_the_readable_merge_unless_the_fused_one_is_switched_on():
    assert not smat.Config().fused_merge and smat.Config.paper().fused_merge  # on where memory demands it
    made = {}
    for fuse in (False, True):
        model = make_model(0, fused_merge=fuse)
        prototypes = torch.randn(5, model.feature_dim, generator=torch.Generator().manual_seed(1))
        made[fuse] = model.task_parameters(prototypes, torch.Generator().manual_seed(2))

    assert type(made[False].theta.grad_fn).__name__ == "AddBackward0"  # interpolate(θ_pre, δ, merge_masks(w, z))
    assert type(made[True].theta.grad_fn).__name__ == "MergeExpertsBackward"
    torch.testing.assert_close(made[True].theta, made[False].theta, rtol=0, atol=0)


@contextmanager
def recomputing(on: bool):
    """Either backward path of MergeExperts on CPU: keep z (the CPU default) or recompute it (CUDA's)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_merge.MergeExperts, "recompute_on", {"cpu", "cuda"} if on else set())
        yield


@pytest.fixture(params=[False, True], ids=["keep-gates", "recompute-gates"])
def recompute(request):
    with recomputing(request.param):
        yield request.param


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 6.0), sampling=st.sampled_from(SAMPLINGS),
       recompute=st.booleans())
def test_fused_merge_equals_the_plain_chain_in_value_and_gradient(seed, scale, sampling, recompute):
    inputs = merge_inputs(seed, scale)

    with recomputing(recompute):
        fast = merge_and_grads(fused, inputs, sampling, seed)
    plain = merge_and_grads(plain_merge, inputs, sampling, seed)

    torch.testing.assert_close(fast[0], plain[0], rtol=0, atol=0)  # the same ops in forward
    assert torch.equal(fast[1], plain[1])
    for got, expected in zip(fast[2], plain[2]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fused_merge_moves_the_generator_on_exactly_as_a_plain_draw(recompute):
    inputs = merge_inputs(0, 2.0)

    *_, fast_generator = merge_and_grads(fused, inputs, "stochastic", 5)
    *_, plain_generator = merge_and_grads(plain_merge, inputs, "stochastic", 5)

    assert torch.equal(torch.rand(8, generator=fast_generator), torch.rand(8, generator=plain_generator))


def test_gates_at_the_clamp_boundaries_pass_no_gradient_to_log_alpha(recompute):
    theta_pre, delta, weights, _ = merge_inputs(1, 1.0, n_experts=2, n_params=4)
    log_alpha = torch.tensor([[9.0, -9.0, 0.0, 0.5], [9.0, -9.0, 0.0, 0.5]], requires_grad=True)

    theta, gates = fused(theta_pre, delta, weights, log_alpha, "test", None)
    (grad,) = torch.autograd.grad(theta.sum(), log_alpha)

    assert gates[:, :2].tolist() == [[1.0, 0.0], [1.0, 0.0]]  # σ(±9)·1.2 - 0.1 is clamped
    assert (grad[:, :2] == 0).all() and (grad[:, 2:] != 0).all()


def test_the_fused_merge_keeps_at_most_the_gates_for_backward_and_none_when_recomputing(recompute):
    n_experts, n_params = 3, 400
    theta_pre, delta, weights, log_alpha = merge_inputs(2, 1.0, n_experts, n_params)
    delta.requires_grad_(), weights.requires_grad_(), log_alpha.requires_grad_()
    shapes = {}

    def pack(t):
        shapes[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for merge, name in [(fused, "fast"), (plain_merge, "plain")]:
            shapes.clear()
            merge(theta_pre, delta, weights, log_alpha, "stochastic", torch.Generator().manual_seed(0))
            new = [n for ptr, n in shapes.items() if ptr != log_alpha.untyped_storage().data_ptr()]
            big = sum(n >= n_experts * n_params for n in new)
            expected = {"fast": 0 if recompute else 1, "plain": 3}[name]  # plain: sigmoid, clamp input, z
            assert big == expected, name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 8.0))
def test_expected_density_with_a_recomputing_backward_equals_the_closed_form(seed, scale):
    log_alpha = (torch.randn(3, 200, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()
    weights = torch.randn(3, generator=torch.Generator().manual_seed(seed + 1))

    density = smat.expected_density(log_alpha)
    plain = torch.sigmoid(log_alpha - smat.BETA * math.log(-smat.GAMMA / smat.ZETA)).mean(dim=-1)

    torch.testing.assert_close(density, plain)
    got, expected = (torch.autograd.grad((d * weights).sum(), log_alpha)[0] for d in (density, plain))
    torch.testing.assert_close(got, expected)


# --- the teacher's first step from the student's graph ----------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
def test_the_teacher_from_the_students_graph_equals_a_teacher_with_its_own_forward(steps):
    model = make_model(0, teacher_steps=steps)
    xs, ys, xq, yq, n_way = make_episode(3)
    theta = model.theta_pre + 0.1 * torch.randn(model.layout.n_params).requires_grad_()
    features = model.features(theta, xs)
    prototypes = smat.class_prototypes(features, ys, n_way)
    theta, prototypes = smat.inner_step(theta, prototypes, features, ys, model.cfg)  # θ' only under the CE
    student_loss = torch.nn.functional.cross_entropy(
        smat.cosine_logits(model.features(theta, xq), prototypes, 10.0), yq)

    reused = smat.dense_teacher(model.features, theta, prototypes, xq, yq, model.cfg, student_loss)
    own = smat.dense_teacher(model.features, theta, prototypes, xq, yq, model.cfg)

    torch.testing.assert_close(reused, own)
    assert student_loss.grad_fn is not None  # the student's graph survives for its own backward


# --- the whole step: fast path against the plain path -------------------------------------------


def step_and_grads(model, episode, seed):
    out = smat.meta_train_step(model, *episode, torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params, allow_unused=True)


@pytest.mark.parametrize("sampling, inner", [("stochastic", True), ("official", True), ("stochastic", False)])
def test_a_meta_training_step_on_the_fast_path_equals_the_plain_path(monkeypatch, recompute, sampling, inner):
    models = {fuse: make_model(0, mask_sampling=sampling, teacher_steps=2, inner_step=inner, fused_merge=fuse)
              for fuse in (True, False)}  # the same seed: the same experts and router
    for model in models.values():
        with torch.no_grad():
            model.delta.copy_(torch.randn(model.layout.n_params, generator=torch.Generator().manual_seed(3)) * 0.05)
    episode = make_episode(4)  # δ ≠ 0 above so that every term of the gradient is exercised
    fast, fast_grads = step_and_grads(models[True], episode, 11)

    teacher = smat.dense_teacher
    monkeypatch.setattr(smat, "dense_teacher", lambda *args: teacher(*args[:6]))  # its own forward
    plain, plain_grads = step_and_grads(models[False], episode, 11)

    torch.testing.assert_close(fast.loss, plain.loss)
    for key in plain.terms:
        torch.testing.assert_close(fast.terms[key], plain.terms[key])
    assert torch.equal(fast.hard_sparsity, plain.hard_sparsity)
    for got, expected in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# --- CUDA (run by benchmarks/gpu_check.sh) ------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_fused_merge_under_bf16_autocast_equals_the_plain_chain(device):
    inputs = merge_inputs(7, 3.0, n_experts=8, n_params=10_000, device=device)

    fast = merge_and_grads(fused, inputs, "stochastic", 7, device, autocast=True)
    plain = merge_and_grads(plain_merge, inputs, "stochastic", 7, device, autocast=True)

    assert fast[0].dtype == torch.float32  # the merged mask is not rounded to bf16
    torch.testing.assert_close(fast[0], plain[0])
    for got, expected in zip(fast[2], plain[2]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_a_cuda_training_step_waits_for_the_device_nowhere_but_in_the_routers_spectral_norm():
    # the exact spectral norm (an SVD) checks its result on the host; everything else must not sync
    model = make_model(0, router_spectral_norm=False).cuda()
    episode = [t.cuda() if isinstance(t, torch.Tensor) else t for t in make_episode(5)]
    smat.meta_train_step(model, *episode, torch.Generator("cuda").manual_seed(0)).loss.backward()  # warm-up
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = smat.meta_train_step(model, *episode, torch.Generator("cuda").manual_seed(1))
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
