"""`--profile paper` end to end on CPU, so the paper's path cannot break unnoticed.

A synthetic Meta-Dataset tree in PMF's h5 layout (an ImageNet-like DAG and Omniglot-like alphabets
as ID sources, a test-only OOD source; benchmarks/synthetic_md.py) and a randomly initialised
ViT-S/16 saved under DINO's key names. The paper's Config with only what must shrink shrunk:
32-px images (a 2x2 patch grid), 1 expert (mixing several is tested on the tiny backbone), meta-batches
of 2, 4 episodes, 2 validation and test episodes per domain. What is left costs ViT-S/16's 21.7 M
parameters: every task samples gates for, merges and updates all of them, and a checkpoint is about
0.4 GB, so this takes about half a minute of CPU.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import data
import flags
import readers
import train
from data import protocol

pytest.importorskip("h5py")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("synthetic_md", REPO / "benchmarks" / "synthetic_md.py")
synthetic_md = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_md)


@pytest.fixture(scope="module")
def paper_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("metadataset_h5")
    data_spec = synthetic_md.write_tree(root, classes=(12, 6, 6), images=6, side=24,
                                        id_sources=("ilsvrc_2012", "omniglot"))
    backbone = synthetic_md.write_dino_vits(root / "dino_deitsmall16_pretrain.pth")
    shrunk = {"data": data_spec, "backbone": backbone, "image_size": 32, "n_experts": 1, "meta_batch": 2,
              "episodes": 4, "val_every": 4, "checkpoint_every": 2, "val_episodes": 2, "test_episodes": 2}
    return flags.make_config("paper", shrunk, None)


def test_the_paper_profile_keeps_its_settings_where_nothing_was_shrunk(paper_config):
    cfg = paper_config

    assert cfg.backbone.startswith("vit_small_patch16:") and cfg.image_size == 32
    assert (cfg.train_protocol, cfg.test_protocol) == ("variable", "variable")
    assert (cfg.delta_lr, cfg.router_lr, cfg.multiplier_lr) == (1e-4, 1e-4, 2e-3)


def test_paper_training_episodes_vary_in_ways_and_shots(paper_config, tmp_path):
    sources = readers.parse_data_spec(paper_config.data, paper_config.image_size, tmp_path)

    episodes = [data.training_episode(sources, protocol(paper_config, "train"), 0, i, 32) for i in range(12)]

    assert len({e.n_way for e in episodes}) > 1 and len({e.domain for e in episodes}) > 1
    assert any(len(set(torch.bincount(e.support_labels).tolist())) > 1 for e in episodes)  # shots vary
    assert all(e.support_images.shape[-1] == 32 for e in episodes)


def test_the_paper_profile_trains_checkpoints_resumes_and_evaluates(paper_config, tmp_path):
    run = tmp_path / "paper"

    train.meta_train(paper_config, run, device="cpu", stop_after=2, evaluate_at_end=False, workers=0)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["episode"] == 2
    train.meta_train(paper_config, run, device="cpu", resume=True, workers=0)

    assert torch.load(run / "checkpoint.pt", weights_only=True)["episode"] == 4
    assert json.loads((run / "config.json").read_text())["precision"] == "auto"
    starts = [json.loads(line)["start"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "start" in json.loads(line)]
    assert [(s["precision"], s["workers"]) for s in starts] == [("fp32", 0), ("fp32", 0)]
    results = json.loads((run / "results.json").read_text())
    assert set(results["domains"]) == {"ilsvrc_2012", "omniglot", "traffic_sign"}
    assert results["domains"]["traffic_sign"]["split"] == "ood"
    assert all(len(d["accuracies"]) == 2 for d in results["domains"].values())


@pytest.mark.parametrize("classes", [5, 6, 11, 12, 40, 43])
def test_the_synthetic_dag_covers_every_class_with_nodes_of_at_least_five_leaves(classes):
    nodes, names = synthetic_md._dag(100, classes)

    inner = [node for node in nodes[1:] if node["children_ids"]]
    assert all(len(node["children_ids"]) >= 5 for node in inner)
    assert sorted(sum((node["children_ids"] for node in inner), [])) == sorted(names.values())
    assert set(names) == set(range(100, 100 + classes))
