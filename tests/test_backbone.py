"""Tests for backbone.py: DINO key layout, timm oracle, position-embedding resampling, flat-vector
functional_call, backbone files, supervised pretraining."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from backbone import (
    PRESETS,
    BackboneError,
    VisionTransformer,
    ViTSpec,
    build_backbone,
    interpolate_pos_embed,
    load_backbone,
    load_dino_weights,
    pretrain_supervised,
    save_backbone,
)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


SMALL_DINO_LAYOUT = ViTSpec(patch_size=16, dim=48, depth=2, heads=3, mlp_ratio=4.0, grid_size=14)


def dino_state_dict(spec: ViTSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under DINO's backbone key names and shapes, spelt out independently of backbone.py."""
    dim, hidden, patch = spec.dim, int(spec.dim * spec.mlp_ratio), spec.patch_size
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + spec.grid_size**2, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(spec.depth):
        shapes |= {
            f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim), f"blocks.{i}.attn.qkv.bias": (3 * dim,),
            f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.norm2.weight": (dim,), f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, dim), f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (dim, hidden), f"blocks.{i}.mlp.fc2.bias": (dim,),
        }
    shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    generator = torch.Generator().manual_seed(seed)
    state = {key: 0.05 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    return {key: 1 + value if "norm" in key and key.endswith("weight") else value for key, value in state.items()}


DINO_HEAD = {"head.mlp.0.weight": torch.zeros(8, 48), "head.last_layer.weight_g": torch.ones(1, 4)}


def assert_loaded(model: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# --- DINO weights ---


def test_official_vit_small_layout_loads_with_every_value_in_its_parameter(tmp_path):
    state = dino_state_dict(PRESETS["vit_small_patch16"])
    torch.save(state, tmp_path / "dino_deitsmall16_pretrain.pth")
    model = build_backbone("vit_small_patch16")

    load_dino_weights(model, str(tmp_path / "dino_deitsmall16_pretrain.pth"))

    assert_loaded(model, state)
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 384)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone."])
def test_prefixed_keys_and_dino_head_keys_are_handled(tmp_path, prefix):
    state = dino_state_dict(SMALL_DINO_LAYOUT)
    torch.save({prefix + k: v for k, v in (state | DINO_HEAD).items()}, tmp_path / "w.pth")
    model = VisionTransformer(SMALL_DINO_LAYOUT)

    load_dino_weights(model, str(tmp_path / "w.pth"))

    assert_loaded(model, state)


def test_full_dino_checkpoint_loads_the_teacher(tmp_path):
    teacher, student = dino_state_dict(SMALL_DINO_LAYOUT, seed=1), dino_state_dict(SMALL_DINO_LAYOUT, seed=2)
    checkpoint = {
        "student": {"module.backbone." + k: v for k, v in student.items()},
        "teacher": {"backbone." + k: v for k, v in (teacher | DINO_HEAD).items()},
        "epoch": 100,
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    model = VisionTransformer(SMALL_DINO_LAYOUT)

    load_dino_weights(model, str(tmp_path / "checkpoint.pth"))

    assert_loaded(model, teacher)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.pop("norm.weight"), ["missing (1): norm.weight", "tiny"]),
        (lambda s: s.update({"blocks.9.norm1.weight": torch.ones(64)}), ["unexpected (1): blocks.9.norm1.w"]),
        (lambda s: s.update({"pos_embed": torch.zeros(1, 65, 64)}),
         ["wrong shape (1): pos_embed (1, 65, 64) != (1, 17, 64)"]),
        (lambda s: s.update({"norm.bias": [0.0] * 64}), ["wrong shape (1): norm.bias list != (64,)"]),
        (lambda s: [s.pop(f"blocks.{i}.mlp.fc1.bias") for i in range(4)], ["missing (4):", ", ..."]),
    ],
)
def test_mismatched_weights_raise_one_line_naming_the_keys_and_preset(tmp_path, edit, expected):
    state = dino_state_dict(PRESETS["tiny"])
    edit(state)
    torch.save(state, tmp_path / "w.pth")

    with pytest.raises(BackboneError) as error:
        load_dino_weights(build_backbone("tiny"), str(tmp_path / "w.pth"))

    assert "\n" not in str(error.value)
    for text in expected:
        assert text in str(error.value)


def test_unreachable_url_asks_for_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # keep the hub cache out of the user's home

    with pytest.raises(BackboneError, match="pass the local file"):
        load_dino_weights(build_backbone("tiny"), "http://127.0.0.1:9/dino.pth")


def test_dino_source_without_official_weights_names_the_valid_presets():
    with pytest.raises(BackboneError, match="valid: vit_small_patch16, vit_base_patch16"):
        load_dino_weights(build_backbone("tiny"), "dino")


def test_missing_weights_file_and_unknown_preset_raise_backbone_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_dino_weights(build_backbone("tiny"), str(tmp_path / "nope.pth"))
    with pytest.raises(BackboneError, match="valid: tiny, vit_small_patch16, vit_base_patch16"):
        build_backbone("vit_huge")


# --- the forward pass: timm oracle, position embeddings ---


@pytest.fixture(scope="module")
def model_and_timm():
    timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm not installed (test extra)")
    model = VisionTransformer(SMALL_DINO_LAYOUT).eval()
    model.load_state_dict(dino_state_dict(SMALL_DINO_LAYOUT))
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=torch.Generator().manual_seed(3)))
    kwargs = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=0, global_pool="token")
    reference = timm_vit.VisionTransformer(img_size=224, dynamic_img_size=True, **kwargs).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    at_128 = timm_vit.VisionTransformer(img_size=128, **kwargs).eval()
    at_128.load_state_dict(model.state_dict() | {"pos_embed": interpolate_pos_embed(model.pos_embed, 8, 8)})
    return model, reference, at_128


@torch.no_grad()
def test_cls_features_equal_timm_at_224_px(model_and_timm):
    model, reference, _ = model_and_timm
    images = torch.randn(3, 3, 224, 224)

    torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cls_features_equal_timm_at_128_px_given_dino_resampled_position_embeddings(model_and_timm):
    model, _, at_128 = model_and_timm
    images = torch.randn(3, 3, 128, 128)

    torch.testing.assert_close(model(images), at_128(images), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cls_features_stay_close_to_timm_dynamic_size_at_128_px(model_and_timm):
    # timm resizes the 14x14 grid to (8, 8) with antialias; DINO scales it by 8.1/14 without, so the
    # position embeddings differ a little. Measured with this rough random pos_embed over 5 seeds:
    # max |diff| 0.014-0.016 on features of mean |x| 0.71, cosine >= 0.99998.
    model, reference, _ = model_and_timm
    images = torch.randn(3, 3, 128, 128)

    ours, theirs = model(images), reference(images)

    assert (ours - theirs).abs().max() < 0.05
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


def bicubic_matrix(new: int, old: int) -> np.ndarray:
    """Rows of weights for PyTorch's bicubic (Keys a = -0.75) at DINO's scale (new + 0.1) / old."""
    a, weights = -0.75, np.zeros((new, old))
    for i in range(new):
        source = (i + 0.5) * old / (new + 0.1) - 0.5
        for tap in range(math.floor(source) - 1, math.floor(source) + 3):
            t = abs(source - tap)
            w = (a + 2) * t**3 - (a + 3) * t**2 + 1 if t <= 1 else a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
            weights[i, min(max(tap, 0), old - 1)] += w if t < 2 else 0.0
    return weights


@settings(max_examples=25, deadline=None)
@given(old=st.integers(2, 14), new_h=st.integers(1, 16), new_w=st.integers(1, 16), seed=st.integers(0, 99))
def test_position_embeddings_resample_as_dino_and_keep_the_cls_entry(old, new_h, new_w, seed):
    generator = torch.Generator().manual_seed(seed)
    pos_embed = torch.randn(1, 1 + old * old, 5, generator=generator, dtype=torch.float64)

    resampled = interpolate_pos_embed(pos_embed, new_h, new_w)

    grid = pos_embed[0, 1:].reshape(old, old, 5).numpy()
    if (new_h, new_w) != (old, old):
        grid = np.einsum("ho,opd,wp->hwd", bicubic_matrix(new_h, old), grid, bicubic_matrix(new_w, old))
    assert resampled.shape == (1, 1 + new_h * new_w, 5)
    assert torch.equal(resampled[:, 0], pos_embed[:, 0])
    np.testing.assert_allclose(resampled[0, 1:].reshape(new_h, new_w, 5).numpy(), grid, atol=1e-10)


def test_position_embeddings_are_untouched_when_the_grid_matches():
    model = build_backbone("tiny")

    assert interpolate_pos_embed(model.pos_embed, 4, 4) is model.pos_embed


def test_images_that_do_not_tile_into_patches_raise_backbone_error():
    with pytest.raises(BackboneError, match="multiples of the patch size 8"):
        build_backbone("tiny")(torch.randn(1, 3, 30, 32))


# --- parameters as one flat vector (how smat.py drives the backbone) ---


def test_functional_call_with_views_of_a_flat_vector_equals_forward_and_backpropagates():
    model = build_backbone("tiny")
    images = torch.randn(5, 3, 32, 32)
    names, params = zip(*model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_()

    views = dict(zip(names, (v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params))))
    features = functional_call(model, views, (images,))
    features.square().sum().backward()

    torch.testing.assert_close(features, model(images))
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_bf16_autocast_on_cpu_gives_nearly_the_float32_features():
    model = VisionTransformer(PRESETS["tiny"])
    images = torch.randn(4, 3, 48, 48)  # 6x6 patches: interpolation runs under autocast too

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images)

    assert torch.nn.functional.cosine_similarity(low.float(), model(images)).min() > 0.98


# --- backbone files ---


def test_save_and_load_round_trip_restores_features_spec_and_meta(tmp_path):
    model, images = build_backbone("tiny"), torch.randn(2, 3, 32, 32)

    save_backbone(model, tmp_path / "sub" / "backbone.pt", {"epochs": 3, "history": [{"loss": 1.5}]})
    loaded, meta = load_backbone(tmp_path / "sub" / "backbone.pt")

    assert loaded.spec == PRESETS["tiny"]
    assert meta == {"epochs": 3, "history": [{"loss": 1.5}]}
    torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["backbone.pt"]  # no temporary file left


def test_truncated_or_foreign_backbone_files_raise_backbone_error(tmp_path):
    save_backbone(build_backbone("tiny"), tmp_path / "backbone.pt", {})
    data = (tmp_path / "backbone.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")

    with pytest.raises(BackboneError, match="cannot read"):
        load_backbone(tmp_path / "truncated.pt")
    with pytest.raises(BackboneError, match="not a backbone file"):
        load_backbone(tmp_path / "foreign.pt")
    with pytest.raises(BackboneError, match="JSON-able"):
        save_backbone(build_backbone("tiny"), tmp_path / "other.pt", {"device": torch.device("cpu")})


# --- supervised pretraining ---


def test_supervised_pretraining_lowers_the_loss_on_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 3
    colours = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    images = colours[labels][:, :, None, None] + 0.5 * torch.randn(96, 3, 32, 32, generator=generator)
    calls = []
    model = build_backbone("tiny")

    history = pretrain_supervised(
        model, images, labels, epochs=4, batch_size=32, lr=3e-3, weight_decay=0.05, seed=0,
        progress=lambda step, total, stats: calls.append((step, total)),
    )

    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["accuracy"] > 0.9
    assert calls[-1] == (12, 12) and len(calls) == 12


def test_pretraining_rejects_a_non_positive_learning_rate():
    with pytest.raises(BackboneError, match="lr > 0"):
        pretrain_supervised(build_backbone("tiny"), torch.zeros(4, 3, 32, 32), torch.zeros(4).long(),
                            epochs=1, batch_size=2, lr=0.0, weight_decay=0.0, seed=0)
