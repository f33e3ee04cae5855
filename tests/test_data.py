"""Tests for data.py, benchmark.py and readers.py: sampler properties (Meta-Dataset's bounds, data.py § 2),
episodes, the embedded benchmark and each real source on data the test itself creates."""

import json
import math
import pickle
import sys
import threading

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import benchmark
import data
import readers

SMALL = dict(n_classes=10, n_images=8)  # a small embedded build: 10 classes -> 6/2/2 per domain

class_sizes = st.lists(st.sampled_from([6, 7, 12, 20, 40, 300, 1300]) | st.integers(2, 60), min_size=5,
                       max_size=80)


def check_variable_bounds(plan: data.EpisodePlan, sizes: list[int]) -> None:
    """Every bound of Meta-Dataset's variable-way/shot sampler (data.py § 2) for one plan."""
    chosen = np.asarray(sizes)[list(plan.classes)]
    ways = len(plan.classes)
    assert data.MIN_WAYS <= ways <= min(data.MAX_WAYS_UPPER_BOUND, len(sizes))
    assert len(set(plan.classes)) == ways
    assert plan.queries == min(10, chosen.min() // 2)
    assert all(1 <= k and k + plan.queries <= n for k, n in zip(plan.shots, chosen))
    assert sum(plan.shots) <= data.MAX_SUPPORT_SET_SIZE
    assert ways * plan.queries <= 500


@settings(max_examples=40, deadline=None)
@given(sizes=class_sizes, seed=st.integers(0, 2**32 - 1))
def test_variable_plan_respects_every_meta_dataset_bound(sizes, seed):
    plan = data.sample_variable_plan(sizes, np.random.default_rng(seed))

    check_variable_bounds(plan, sizes)


@settings(max_examples=25, deadline=None)
@given(alphabet_sizes=st.lists(st.integers(14, 55), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_omniglot_episodes_draw_all_classes_from_one_alphabet(alphabet_sizes, seed):
    starts = np.cumsum([0] + alphabet_sizes)
    hierarchy = data.Hierarchy("bilevel", tuple(tuple(range(starts[i], starts[i + 1]))
                                                 for i in range(len(alphabet_sizes))))
    sizes = [20] * int(starts[-1])

    plan = data.sample_variable_plan(sizes, np.random.default_rng(seed), hierarchy)

    check_variable_bounds(plan, sizes)
    assert any(set(plan.classes) <= set(group) for group in hierarchy.groups)
    assert plan.queries == 10  # 20 images per class -> 10 queries [MD §1.6 step 3]


def test_dag_episodes_take_the_leaves_of_one_eligible_node():
    # root -> {a, b}; a spans 6 leaves, b spans 3 (ineligible: < 5 ways), root spans 9.
    children = {"root": ["a", "b"], "a": [f"l{i}" for i in range(6)], "b": ["l6", "l7", "l8"]}
    children.update({f"l{i}": [] for i in range(9)})
    hierarchy = data.dag_hierarchy(children, {f"l{i}": i for i in range(9)})

    plans = [data.sample_variable_plan([30] * 9, np.random.default_rng(s), hierarchy) for s in range(40)]

    assert {tuple(sorted(p.classes)) for p in plans} == {tuple(range(6)), tuple(range(9))}


@settings(max_examples=40, deadline=None)
@given(sizes=class_sizes, ways=st.integers(2, 10), shots=st.integers(1, 5), queries=st.integers(1, 15),
       seed=st.integers(0, 1000))
def test_fixed_plan_has_requested_counts_or_says_why_not(sizes, ways, shots, queries, seed):
    rng = np.random.default_rng(seed)
    if ways > len(sizes) or min(sizes) < shots + queries:
        with pytest.raises(data.DataError):
            data.sample_fixed_plan(sizes, ways, shots, queries, rng)
        return

    plan = data.sample_fixed_plan(sizes, ways, shots, queries, rng)

    assert len(set(plan.classes)) == ways and plan.shots == (shots,) * ways and plan.queries == queries


@settings(max_examples=25, deadline=None)
@given(sizes=class_sizes, seed=st.integers(0, 1000))
def test_same_seed_gives_the_same_plan(sizes, seed):
    first = data.sample_variable_plan(sizes, np.random.default_rng(seed))
    second = data.sample_variable_plan(sizes, np.random.default_rng(seed))

    assert first == second


class CountingSource(data.Source):
    """Images whose pixels encode (class, image index), to check which images an episode used."""

    name, split = "counting", "id"

    def __init__(self, sizes):
        self.sizes = sizes

    def class_sizes(self, partition):
        return list(self.sizes)

    def load(self, partition, class_index, image_indices, image_size):
        codes = torch.tensor([[class_index, i] for i in image_indices], dtype=torch.uint8)
        return codes.view(-1, 2, 1, 1).expand(-1, 2, 8, 8)[:, [0, 1, 1]].contiguous()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(6, 40), min_size=5, max_size=30), seed=st.integers(0, 1000))
def test_episode_support_and_query_are_disjoint_and_labels_a_bijection(sizes, seed):
    rng = np.random.default_rng(seed)
    plan = data.sample_variable_plan(sizes, rng)

    episode = data.make_episode(CountingSource(sizes), "train", plan, rng, augment=False, image_size=8)

    std, mean = torch.tensor(data.IMAGENET_STD[:2]), torch.tensor(data.IMAGENET_MEAN[:2])
    decode = lambda images: {tuple(v) for v in (images[:, :2, 0, 0] * std + mean).mul(255).round().int().tolist()}  # noqa: E731
    support, query = decode(episode.support_images), decode(episode.query_images)
    assert not support & query
    assert len(support) == episode.support_images.shape[0] and len(query) == episode.query_images.shape[0]
    assert sorted(set(episode.support_labels.tolist())) == list(range(len(plan.classes))) == \
        sorted(set(episode.query_labels.tolist()))
    assert episode.n_way == len(plan.classes)


def test_malformed_episode_fails_where_it_is_built():
    with pytest.raises(Exception, match="n_support"):
        data.Episode(torch.zeros(3, 3, 8, 8), torch.zeros(4, dtype=torch.int64), torch.zeros(2, 3, 8, 8),
                     torch.zeros(2, dtype=torch.int64), "x", "id")


# --- the embedded benchmark ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, benchmark.embedded_sources(seed=0, cache_dir=cache, **SMALL)


def test_embedded_benchmark_has_five_id_and_three_ood_domains(embedded):
    _, sources = embedded

    splits = [s.split for s in sources]

    assert splits.count("id") >= 5 and splits.count("ood") >= 3 and len({s.name for s in sources}) == len(sources)


def test_the_embedded_ood_domains_are_three_near_and_three_far_and_the_near_strokes_and_points_are_dark_on_light(
        embedded):
    _, sources = embedded
    by_name = {s.name: s for s in sources}

    assert sorted(s.split for s in sources).count("id") == 5
    assert sorted(s.name for s in sources if s.distance == "near") == ["scripts", "specks", "stars"]
    assert sorted(s.name for s in sources if s.distance == "far") == ["curves", "mosaics", "rosettes"]
    assert all(s.distance is None for s in sources if s.split == "id")
    # sparse ink: the background fills most pixels, so the median is the background's brightness
    median = {name: by_name[name].load("test", 0, range(3), 32).float().median().item() for name in by_name}
    assert median["scripts"] > 128 > median["glyphs"] and median["specks"] > 128 > median["constellations"]


def test_embedded_build_is_deterministic_and_seed_dependent(embedded, tmp_path):
    cache, _ = embedded

    again = benchmark.build_embedded(seed=0, cache_dir=tmp_path / "other", **SMALL)
    cached = benchmark.build_embedded(seed=0, cache_dir=cache, **SMALL)
    different = benchmark.build_embedded(seed=1, cache_dir=tmp_path / "other", **SMALL)

    assert all(torch.equal(again[n], cached[n]) for n in benchmark.EMBEDDED_DOMAINS)
    assert not torch.equal(again["glyphs"], different["glyphs"])


def test_embedded_class_splits_are_disjoint_and_cover_every_class(embedded):
    _, sources = embedded

    for source in sources:
        ranges = [set(source.classes(p)) for p in data.PARTITIONS]
        assert not (ranges[0] & ranges[1] or ranges[0] & ranges[2] or ranges[1] & ranges[2])
        assert set().union(*ranges) == set(range(SMALL["n_classes"]))


def test_embedded_classes_have_distinct_images(embedded):
    _, sources = embedded

    for source in sources:
        images = source._images.flatten(2).float()
        class_means = images.mean(1)
        assert torch.cdist(class_means, class_means).add(torch.eye(len(class_means)) * 1e9).min() > 0


def test_corrupt_or_truncated_cache_is_rebuilt(embedded):
    cache, _ = embedded
    reference = benchmark.build_embedded(seed=0, cache_dir=cache, **SMALL)
    path = next((cache / "embedded").glob("*.pt"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    rebuilt = benchmark.build_embedded(seed=0, cache_dir=cache, **SMALL)

    assert all(torch.equal(reference[n], rebuilt[n]) for n in benchmark.EMBEDDED_DOMAINS)
    assert torch.load(path, weights_only=True)["sha256"] == benchmark._digest(reference)


def test_cache_with_flipped_pixels_is_detected_and_rebuilt(embedded):
    cache, _ = embedded
    path = next((cache / "embedded").glob("*.pt"))
    stored = torch.load(path, weights_only=True)
    stored["domains"]["glyphs"][0, 0, 0, 0, 0] ^= 1
    torch.save(stored, path)

    rebuilt = benchmark.build_embedded(seed=0, cache_dir=cache, **SMALL)

    assert rebuilt["glyphs"][0, 0, 0, 0, 0] != stored["domains"]["glyphs"][0, 0, 0, 0, 0]


def test_training_episode_is_a_pure_function_of_seed_and_index(embedded):
    _, sources = embedded
    protocol = data.Protocol("variable")

    first, second = (data.training_episode(sources, protocol, seed=3, index=7, image_size=16) for _ in range(2))
    other = data.training_episode(sources, protocol, seed=3, index=8, image_size=16)

    assert torch.equal(first.support_images, second.support_images) and torch.equal(first.query_labels,
                                                                                     second.query_labels)
    assert first.split == "id" and first.support_images.shape[-1] == 16
    assert first.support_images.shape != other.support_images.shape or not torch.equal(
        first.support_images, other.support_images)


def assert_same_episode(a: data.Episode, b: data.Episode) -> None:
    assert (a.domain, a.split) == (b.domain, b.split)
    for name in ("support_images", "support_labels", "query_images", "query_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def streamed(sources, protocol, workers, **where):
    with data.training_stream(sources, protocol, seed=5, image_size=32, workers=workers, **where) as episodes:
        return list(episodes)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_gives_the_bits_of_direct_calls_in_order_with_start_and_stride(embedded, workers):
    _, sources = embedded
    protocol = data.Protocol("variable")

    episodes = streamed(sources, protocol, workers, start=2, stride=3, count=5)

    assert len(episodes) == 5
    for k, episode in enumerate(episodes):
        assert_same_episode(episode, data.training_episode(sources, protocol, 5, 2 + 3 * k, 32))


def test_episodes_are_made_with_one_thread_whatever_the_caller_uses(embedded, monkeypatch):
    _, sources = embedded
    protocol = data.Protocol("fixed", ways=3, shots=2, queries=3)
    threads, real = [], data.training_episode

    def counting(*args):
        threads.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(data, "training_episode", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (episode,) = streamed(sources, protocol, 0, start=0, count=1)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

    assert threads == [1] and after == 2  # one thread while making it, the caller's setting restored
    assert_same_episode(episode, real(sources, protocol, 5, 0, 32))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_error_in_the_stream_keeps_its_one_line_message(embedded, workers):
    _, sources = embedded

    with data.training_stream(sources, data.Protocol("fixed", ways=50), seed=0, image_size=32, start=0, count=3,
                              workers=workers) as episodes:
        with pytest.raises(data.DataError, match="50-way") as error:
            next(episodes)

    assert "\n" not in str(error.value)


def test_evaluation_episodes_are_deterministic_unaugmented_and_ood_aware(embedded):
    _, sources = embedded
    ood = next(s for s in sources if s.split == "ood")
    protocol = data.Protocol("fixed", ways=2, shots=1, queries=2)

    first = list(data.evaluation_episodes(ood, "test", protocol, 3, seed=0, image_size=32))
    second = list(data.evaluation_episodes(ood, "test", protocol, 3, seed=0, image_size=32))

    assert all(torch.equal(a.query_images, b.query_images) for a, b in zip(first, second))
    assert first[0].split == "ood" and first[0].domain == ood.name
    raw = ood._images[ood.classes("test")].float().div(255)  # unaugmented: every image is a stored one
    stored = data.normalise(raw.flatten(0, 1))
    assert all(any(torch.allclose(img, s, atol=1e-5) for s in stored) for img in first[0].query_images)


def test_too_many_ways_and_too_few_images_are_clear_data_errors(embedded):
    _, sources = embedded

    with pytest.raises(data.DataError, match="50-way episodes need 50 classes"):
        next(data.evaluation_episodes(sources[0], "test", data.Protocol("fixed", ways=50), 1, 0, 32))
    with pytest.raises(data.DataError, match="fewer than shots \\+ queries"):
        next(data.evaluation_episodes(sources[0], "test", data.Protocol("fixed", ways=2, shots=5, queries=15), 1, 0, 32))


# --- real sources on data the test writes --------------------------------------------------------


def write_png(path, value, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_folder_source_splits_classes_and_names_a_corrupt_file(tmp_path):
    for c in range(12):
        for i in range(4):
            write_png(tmp_path / "birds" / f"class{c:02d}" / f"{i}.png", 10 * c + i)
    (tmp_path / "birds" / "class03" / "9.png").write_bytes(b"not a png")

    (source,) = readers.parse_data_spec(f"folder:{tmp_path / 'birds'}", image_size=16)

    assert source.name == "birds" and source.split == "id"
    assert sum(len(source.class_sizes(p)) for p in data.PARTITIONS) == 12
    episode = next(data.evaluation_episodes(source, "train", data.Protocol("fixed", ways=2, shots=1, queries=1), 1, 0, 16))
    assert episode.support_images.shape == (2, 3, 16, 16)
    partition = next(p for p in data.PARTITIONS
                     if any("class03" in str(c[0]) for c in source._classes[p]))
    index = next(k for k, c in enumerate(source._classes[partition]) if "class03" in str(c[0]))
    with pytest.raises(data.DataError, match="9.png"):
        source.load(partition, index, range(5), 16)


def test_folder_of_domains_with_split_file_and_ood_mark(tmp_path):
    for domain in ("a", "b"):
        for c in range(6):
            for i in range(3):
                write_png(tmp_path / domain / f"c{c}" / f"{i}.jpg", c)
    (tmp_path / "a" / "splits.json").write_text(json.dumps({"train": ["c0", "c1"], "val": ["c2"], "test": ["c5"]}))

    sources = readers.parse_data_spec(f"folder:{tmp_path}@ood", image_size=16)

    assert [s.name for s in sources] == ["a", "b"] and {s.split for s in sources} == {"ood"}
    assert [len(sources[0].class_sizes(p)) for p in data.PARTITIONS] == [2, 1, 1]
    assert [len(sources[1].class_sizes(p)) for p in data.PARTITIONS] == [0, 0, 6]


def write_fake_omniglot(root):
    alphabets = {"background": ["Latin", "Tagalog"], "evaluation": ["Futurama"]}
    for part, names in alphabets.items():
        for alphabet in names:
            for c in range(6):
                for i in range(3):
                    write_png(root / "omniglot-py" / f"images_{part}" / alphabet / f"character{c:02d}" / f"{i}.png",
                              40 * c, (20, 20))


def test_torchvision_omniglot_keeps_alphabets_as_hierarchy(tmp_path):
    write_fake_omniglot(tmp_path)

    (source,) = readers.parse_data_spec(f"torchvision:omniglot:{tmp_path}", image_size=16)

    assert [len(source.class_sizes(p)) for p in data.PARTITIONS] == [6, 6, 6]  # Tagalog is an MD valid alphabet
    assert source.hierarchy("train").groups == (tuple(range(6)),)
    plan = data.sample_variable_plan(source.class_sizes("test"), np.random.default_rng(0), source.hierarchy("test"))
    episode = data.make_episode(source, "test", plan, np.random.default_rng(0), augment=True, image_size=16)
    assert episode.support_images.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("name", ["cifar100", "CIFAR100", "Cifar100"])
def test_torchvision_cifar100_layout_is_read_without_download(tmp_path, name):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 60), ("test", 20)):
        with open(folder / part, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "fine_labels": [i % 10 for i in range(n)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(10)]}, f)

    (source,) = readers.parse_data_spec(f"torchvision:{name}:{tmp_path}", image_size=16)

    assert source.name == "cifar100" and source.split == "ood" and source.class_sizes("test") == [8] * 10
    assert source.load("test", 0, [0, 1], 16).shape == (2, 3, 18, 18)  # 16 / (224 / 256) -> 18


def test_torchvision_datasets_are_named_by_key_or_class_name_in_any_case():
    assert readers.torchvision_name("FGVCAircraft") == readers.torchvision_name("fgvc_aircraft") == "fgvc_aircraft"
    assert readers.torchvision_name("flowers102") == readers.torchvision_name("FLOWERS102") == "flowers102"


def test_a_missing_torchvision_dataset_is_downloaded_only_when_the_source_asks(tmp_path, monkeypatch):
    attempts = []

    def part(cls, root, arguments, local):
        attempts.append("local" if local else "download")
        if local:
            raise RuntimeError("Dataset not found")
        return object(), [0, 1, 2, 3, 4, 5] * 2, None

    monkeypatch.setattr(readers, "_torchvision_part", part)

    with pytest.raises(data.DataError, match=f"add :download=1 to download it: torchvision:gtsrb:{tmp_path}:download=1"):
        readers.parse_data_spec(f"torchvision:GTSRB:{tmp_path}", image_size=16)
    assert attempts == ["local"]

    (source,) = readers.parse_data_spec(f"torchvision:GTSRB:{tmp_path}:download=1@ood", image_size=16)

    assert attempts == ["local", "local", "download"] and source.name == "gtsrb" and source.split == "ood"


def write_pmf_h5(directory, n_classes=(6, 2, 5), images=7):
    directory.mkdir(parents=True)
    total = sum(n_classes)
    spec = {"name": "tiny", "classes_per_split": {"TRAIN": n_classes[0], "VALID": n_classes[1], "TEST": n_classes[2]},
            "images_per_class": {str(c): images for c in range(total)}}
    (directory / "dataset_spec.json").write_text(json.dumps(spec))
    for c in range(total):
        with h5py.File(directory / f"{c}.h5", "w") as f:
            for i in range(images):
                group = f.create_group(str(i))
                group["image"] = np.full((30, 40, 3), c * 10 + i, dtype=np.uint8)
                group["label"], group["id"] = c, i


def test_h5_source_reads_pmf_layout_with_a_bounded_number_of_open_files(tmp_path):
    write_pmf_h5(tmp_path / "tiny")
    (source,) = readers.parse_data_spec(f"h5:{tmp_path / 'tiny'}", image_size=16)
    source.files.max_open = 3

    episodes = list(data.evaluation_episodes(source, "test", data.Protocol("variable"), 4, seed=0, image_size=16))

    assert source.split == "id" and source.class_sizes("test") == [7] * 5
    assert all(e.n_way == 5 and e.query_images.shape[0] == 15 for e in episodes)  # 7 images -> 3 queries
    assert len(source.files) == 3
    image = source.load("val", 1, [2], 16)[0, 0, 0, 0]  # val class 1 = absolute class 7, record 2
    assert int(image) == 72


def test_forked_workers_read_h5_files_the_parent_had_open(tmp_path):
    write_pmf_h5(tmp_path / "tiny", n_classes=(6, 2, 5), images=7)
    (source,) = readers.parse_data_spec(f"h5:{tmp_path / 'tiny'}", image_size=16)
    source.load("train", 0, [0], 16)  # the parent holds an open h5 file when the workers fork
    protocol = data.Protocol("variable")

    with data.training_stream([source], protocol, seed=1, image_size=16, start=0, count=4, workers=2) as episodes:
        got = list(episodes)

    for k, episode in enumerate(got):
        assert_same_episode(episode, data.training_episode([source], protocol, 1, k, 16))
    assert len(source.files) >= 1  # the parent's handles are still its own


@pytest.mark.parametrize("spec, message", [
    ("folder:/no/such/dir", "does not exist"),
    ("nosuch:thing", "cannot parse data source"),
    ("torchvision:imagenet21k:/tmp", "unknown torchvision dataset"),
    ("embedded:nosuch", "unknown embedded domain"),
    ("h5:/no/such/source", "dataset_spec.json does not exist"),
    ("embedded@both", "unknown split mark"),
])
def test_bad_data_specs_raise_one_line_data_errors(spec, message):
    with pytest.raises(data.DataError, match=message) as error:
        readers.parse_data_spec(spec, image_size=32)

    assert "\n" not in str(error.value)


def test_empty_image_file_is_named(tmp_path):
    for c in range(2):
        write_png(tmp_path / "d" / f"c{c}" / "0.png", 0)
    (tmp_path / "d" / "c1" / "1.png").write_bytes(b"")

    with pytest.raises(data.DataError, match="1.png is empty"):
        readers.folder_sources(tmp_path / "d", "ood")


# --- folder layouts users have ----------------------------------------------------------------------


def write_classes(folder, names, n_images=4):
    for name in names:
        for i in range(n_images):
            write_png(folder / name / f"{i}.png", 7)


def partition_names(source):
    return {p: source.class_names(p) for p in data.PARTITIONS}


def test_one_folder_of_classes_is_one_domain_split_by_seed(tmp_path):
    write_classes(tmp_path / "birds", [f"c{k:02d}" for k in range(10)])

    (source,) = readers.folder_sources(tmp_path / "birds")

    names = partition_names(source)
    assert source.name == "birds" and sorted(sum(names.values(), [])) == [f"c{k:02d}" for k in range(10)]
    assert all(names[p] for p in data.PARTITIONS)


def test_split_folders_give_the_split_and_it_is_kept(tmp_path):
    write_classes(tmp_path / "mini" / "train", ["n01", "n02", "n03"])
    write_classes(tmp_path / "mini" / "val", ["n04"])
    write_classes(tmp_path / "mini" / "test", ["n05", "n06"])

    (source,) = readers.parse_data_spec(f"folder:{tmp_path / 'mini'}", image_size=16)

    assert source.name == "mini" and source.split == "id"
    assert partition_names(source) == {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05", "n06"]}


def test_domains_of_split_folders_keep_each_given_split(tmp_path):
    for domain in ("photos", "sketches"):
        write_classes(tmp_path / domain / "train", ["a", "b"])
        write_classes(tmp_path / domain / "test", ["c"])

    sources = readers.folder_sources(tmp_path)

    assert [s.name for s in sources] == ["photos", "sketches"]
    assert all(partition_names(s) == {"train": ["a", "b"], "val": [], "test": ["c"]} for s in sources)


def test_no_test_split_class_ever_appears_in_a_training_episode(tmp_path):
    train, test = [f"train{k:02d}" for k in range(6)], [f"test{k:02d}" for k in range(6)]
    write_classes(tmp_path / "mini" / "train", train, n_images=3)
    write_classes(tmp_path / "mini" / "val", ["val00", "val01"], n_images=3)
    write_classes(tmp_path / "mini" / "test", test, n_images=3)
    (source,) = readers.parse_data_spec(f"folder:{tmp_path / 'mini'}", image_size=16)
    read, seen = source._read, set()

    def recording_read(path):
        seen.add(path.parent.name)
        return read(path)

    source._read = recording_read
    for index in range(40):
        data.training_episode([source], data.Protocol("fixed", ways=3, shots=1, queries=1), 0, index, 16)

    assert seen and seen <= set(train)


def test_minimagenet_csv_split_files_read_images_from_the_images_folder(tmp_path):
    root = tmp_path / "mini"
    rows = {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04", "n05"]}
    for partition, labels in rows.items():
        lines = ["filename,label"]
        for label in labels:
            for i in range(3):
                write_png(root / "images" / f"{label}{i:04d}.jpg", 9)
                lines.append(f"{label}{i:04d}.jpg,{label}")
        (root / f"{partition}.csv").write_text("\n".join(lines) + "\n")

    (source,) = readers.folder_sources(root)

    assert partition_names(source) == rows and source.class_sizes("test") == [3, 3]
    assert source.load("val", 0, [0], 16).shape == (1, 3, 18, 18)


@pytest.mark.parametrize("make, message", [
    (lambda r: (write_classes(r / "train", ["a"]), write_classes(r / "test", ["b"]), write_classes(r / "extra", ["c"])),
     "mixes split folders train/test with other folders \\['extra'\\]"),
    (lambda r: (write_classes(r / "train", ["a"]), (r / "test.csv").write_text("filename,label\n")),
     "more than one way \\(split folders train and split files test.csv\\)"),
    (lambda r: (write_classes(r / "train", ["a"]), (r / "splits.json").write_text("{}")),
     "more than one way \\(split folders train and splits.json\\)"),
    (lambda r: (write_classes(r / "train", ["a", "b"]), write_classes(r / "test", ["b"])),
     "class b is in both the train and the test split"),
    (lambda r: (r.mkdir(parents=True), (r / "train.csv").write_text("file,class\nx.png,a\n")),
     "must start with the header filename,label"),
    (lambda r: (r.mkdir(parents=True), (r / "train.csv").write_text("filename,label\nx.png,a\n")),
     "names x.png, which is not in"),
])
def test_a_mixed_or_broken_layout_is_one_line_naming_what_was_found(tmp_path, make, message):
    make(tmp_path / "d")

    with pytest.raises(data.DataError, match=message) as error:
        readers.folder_sources(tmp_path / "d")

    assert "\n" not in str(error.value)


def out_of_place_train_transform(images, rng, crop_scale, image_size):
    """The training transform as first written, one new tensor per operation: the oracle for the
    in-place version, which must give the same bits (checkpoints of a seed must not change)."""
    n = images.shape[0]
    area = rng.uniform(*crop_scale, size=n)
    log_ratio = rng.uniform(math.log(3 / 4), math.log(4 / 3), size=n)
    width = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)
    height = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
    centre_x = rng.uniform(-1, 1, size=n) * (1 - width)
    centre_y = rng.uniform(-1, 1, size=n) * (1 - height)
    flip = np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta), [n, 3, image_size, image_size],
                                           align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                             align_corners=False)
    brightness, contrast, saturation = (torch.from_numpy(rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(np.float32))
                                        for _ in range(3))
    images = (images * brightness).clamp(0, 1)
    gray = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    images = ((images - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)).clamp(0, 1)
    gray = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    images = ((images - gray) * saturation + gray).clamp(0, 1)
    return (images - torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("n, side, size", [(7, 40, 32), (30, 146, 128), (3, 20, 16)])
def test_the_in_place_training_transform_gives_the_bits_of_the_out_of_place_one(n, side, size):
    images = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(n))

    fast = data.normalise(data._train_transform(images.clone(), np.random.default_rng(n), (0.08, 1.0), size),
                          in_place=True)
    plain = out_of_place_train_transform(images.clone(), np.random.default_rng(n), (0.08, 1.0), size)

    assert torch.equal(fast, plain)


def test_a_data_worker_keeps_quiet_only_about_a_sharing_thread_whose_connection_the_stopping_trainer_dropped(
        monkeypatch):
    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, traceback: printed.append(kind))
    data.quiet_sharing_threads(0)

    def report(kind):
        sys.excepthook(kind, kind(), None)

    for kind in (ConnectionResetError, EOFError, ValueError):  # as multiprocessing.resource_sharer reports them
        thread = threading.Thread(target=report, args=(kind,))
        thread.start()
        thread.join()
    report(ConnectionResetError)  # the worker's own (main) thread

    assert printed == [ValueError, ConnectionResetError]
