"""The diagnostics of docs/results.md on two tiny runs (train.py's command line, a random 1-block ViT,
16-px folder domains). benchmarks/delta_scaling.py: at s = 1 it is the run's own final test, at s = 0
the frozen model (Pre), and --norm-of lands on the other run's update norm. benchmarks/polarity_check.py:
the inverted domains are the same episodes with every pixel inverted, Pre beside them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from assets import make_assets


ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


delta_scaling, polarity_check = script("delta_scaling"), script("polarity_check")
EPISODES = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A SMAT and a PMF run on one ID and one OOD folder domain, each with its final test."""
    base = make_assets(tmp_path_factory.mktemp("scaling"))
    common = ["--data", f"folder:{base / 'alpha'}@id,folder:{base / 'beta'}@ood", "--backbone", str(base / "vit.pt"),
              "--set", "image_size=16", "--episodes", "8", "--set", "meta_batch=2", "--test-episodes", str(EPISODES),
              "--set", "train_ways=3", "--set", "train_shots=2", "--set", "train_queries=2", "--set", "test_ways=3",
              "--set", "test_shots=2", "--set", "test_queries=2", "--set", "val_every=4", "--set", "val_episodes=2",
              "--set", "mask_lr=10.0", "--no-check-shapes"]
    made = {}
    for name, flags in (("smat", ["--experts", "2"]), ("pmf", ["--method", "pmf", "--experts", "1"])):
        made[name] = base / name
        subprocess.run([sys.executable, "train.py", "--out", str(made[name]), *flags, *common], cwd=ROOT,
                       check=True, capture_output=True, text=True, timeout=300)
    return made


def test_scale_one_is_the_runs_own_test_and_scale_zero_is_the_frozen_model(runs):
    scaled = delta_scaling.scaled(runs["smat"], [0.0, 1.0], EPISODES)
    own = json.loads((runs["smat"] / "results.json").read_text())

    for name, domain in own["domains"].items():
        assert scaled["scales"]["1"]["domains"][name]["accuracies"] == domain["accuracies"]
        assert scaled["scales"]["0"]["domains"][name]["accuracies"] == own["baselines"]["Pre"]["domains"][name]["accuracies"]
    assert scaled["norms"]["0"] == 0.0 and scaled["norms"]["1"] == pytest.approx(delta_scaling.tested_update_norm(runs["smat"]))


def test_norm_of_tests_the_run_at_the_other_runs_update_norm_and_writes_one_file(runs):
    code = delta_scaling.main([str(runs["pmf"]), "--scales", "1", "--episodes", str(EPISODES),
                               "--norm-of", str(runs["smat"])])

    written = json.loads((runs["pmf"] / f"delta-scaling-{EPISODES}ep.json").read_text())
    assert code == 0 and written["matched"]["to"] == "smat"
    matched = list(written["norms"].values())[-1]
    assert matched == pytest.approx(delta_scaling.tested_update_norm(runs["smat"]), rel=1e-5)


def test_bad_scales_are_one_line_and_exit_2(runs, capsys):
    assert delta_scaling.main([str(runs["pmf"]), "--scales", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_inverted_domains_hold_the_same_episodes_with_every_pixel_inverted(runs):
    import data
    import readers

    ood = [s for s in readers.parse_data_spec(f"folder:{runs['smat'].parent / 'beta'}@ood", 16) if s.split == "ood"]
    inverted = polarity_check.Inverted(ood[0])
    original = ood[0].load("test", 0, [0, 1], 16)

    assert torch.equal(inverted.load("test", 0, [0, 1], 16), 255 - original)
    assert inverted.class_names("test") == ood[0].class_names("test") and inverted.split == "ood"
    protocol = data.Protocol("fixed", ways=3, shots=2, queries=2)
    first, second = (next(iter(data.evaluation_episodes(s, "test", protocol, 1, 0, 16))) for s in (ood[0], inverted))
    assert torch.equal(first.support_labels, second.support_labels)
    assert polarity_check.main([str(runs["pmf"]), "--episodes", str(EPISODES)]) == 0
    written = json.loads((runs["pmf"] / f"polarity-inverted-{EPISODES}ep.json").read_text())
    assert list(written["domains"]) == ["beta"] and written["baselines"]["Pre"]["method"] == "pre"


def test_the_frechet_distance_is_zero_for_one_sample_and_the_squared_shift_for_a_shifted_copy():
    domain_distance = script("domain_distance")
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    shift = torch.tensor([3.0, 0.0, -1.0, 0.0, 0.0, 2.0], dtype=torch.float64)

    assert domain_distance.frechet(features, features) == pytest.approx(0.0, abs=1e-6)
    assert domain_distance.frechet(features, features + shift) == pytest.approx(shift.pow(2).sum().item(), rel=1e-6)
    # doubled: mean 2μ and covariance 4Σ, so ‖μ‖² + Tr(Σ + 4Σ − 2·2Σ) = ‖μ‖² + Tr Σ
    expected = features.mean(0).pow(2).sum() + features.T.cov().trace()
    assert domain_distance.frechet(features, 2 * features) == pytest.approx(expected.item(), rel=1e-6)
