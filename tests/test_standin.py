"""The stand-in for DINO (standin.py): its corpus and the shipped weights it made."""

import torch

import backbone as backbones
import benchmark
import standin


def test_the_corpus_is_deterministic_with_classes_numbered_across_families():
    images, labels = standin.build_corpus(classes_per_family=3, images_per_class=4, resolution=32)
    again, _ = standin.build_corpus(classes_per_family=3, images_per_class=4, resolution=32)

    n_families = len(standin.FAMILIES)
    assert images.shape == (n_families * 3 * 4, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(n_families * 3) for _ in range(4)]
    assert torch.equal(images, again)


def test_in_every_family_a_class_is_a_structure_instances_of_one_class_are_closer_than_others():
    images, labels = standin.build_corpus(classes_per_family=6, images_per_class=6, resolution=32)
    grey = images.float().mean(1).flatten(1)
    # polarity and colour are nuisances: compare contrast-normalised luminance
    grey = (grey - grey.mean(1, keepdim=True)) / (grey.std(1, keepdim=True) + 1e-6)

    for family in range(len(standin.FAMILIES)):
        rows = (labels // 6) == family
        x, y = grey[rows], labels[rows]
        similarity = (x @ x.T / x.shape[1]).abs()  # |correlation|: ink/background polarity is random
        same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
        different = y[:, None] != y[None]
        assert similarity[same].mean() > similarity[different].mean(), list(standin.FAMILIES)[family]


def test_the_corpus_has_both_polarities_so_features_are_not_tied_to_light_ink_on_dark():
    images, _ = standin.build_corpus(classes_per_family=4, images_per_class=8, resolution=32)
    border = torch.cat([images[:, :, 0], images[:, :, -1]], dim=-1).float().mean((1, 2))  # background level

    assert (border > 150).float().mean() > 0.25 and (border < 100).float().mean() > 0.25


def test_no_corpus_family_is_a_benchmark_domain():
    assert not set(standin.FAMILIES) & set(benchmark.EMBEDDED_DOMAINS)


def test_pretraining_writes_a_backbone_file_that_records_its_recipe(tmp_path):
    recipe = standin.RECIPE | dict(classes_per_family=2, images_per_class=4, epochs=1, batch_size=16)

    meta = standin.pretrain(recipe, tmp_path / "tiny.pt", log=lambda _: None)

    model, saved = backbones.load_backbone(tmp_path / "tiny.pt")
    assert model.spec == backbones.PRESETS["tiny"]
    assert saved["recipe"] == recipe and saved["families"] == list(standin.FAMILIES)
    assert len(meta["history"]) == 1


def test_the_shipped_weights_were_made_by_the_committed_recipe():
    _, meta = backbones.load_backbone(backbones.SHIPPED_WEIGHTS["tiny"][0])

    assert meta["recipe"] == standin.RECIPE and meta["families"] == list(standin.FAMILIES)
    assert meta["corpus_seed"] == standin.CORPUS_SEED and meta["command"] == "python standin.py"
