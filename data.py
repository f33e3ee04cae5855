"""Episodes for SMAT: the Episode type, Meta-Dataset's samplers, and episodes made from any source.

Reading order: § 1 `Episode` (what every other module consumes) -> § 2 the samplers, pure functions
of (class sizes, hierarchy, random generator) that return an `EpisodePlan` [MD sampling.py] -> § 3
`Source` (one domain: class sizes and a loader) and `make_episode`, `training_episode`,
`training_stream` (the same episodes from worker processes), `evaluation_episodes` (plans turned
into tensors). The sources themselves live elsewhere: benchmark.py is the embedded procedural
benchmark (the default `--data`), readers.py reads image folders, torchvision datasets and
Meta-Dataset's h5 files, and its `parse_data_spec` turns one `--data` string into sources.

The protocol facts (query rule, support budget, log-uniform class weights, Omniglot and ImageNet
hierarchies) follow Meta-Dataset v1 (Triantafillou et al., ICLR 2020) and its code [MD sampling.py,
data_config_common.gin], re-implemented here; no Meta-Dataset, PMF or SMAT code is copied.
"""

import math
import multiprocessing
import os
import sys
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, UInt8, jaxtyped
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns all checks off

Split = Literal["id", "ood"]
OODDistance = Literal["near", "far"]  # how close an OOD domain is to the ID ones, where known
Partition = Literal["train", "val", "test"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics DINO and PMF normalise with [PMF datasets]
IMAGENET_STD = (0.229, 0.224, 0.225)
PARTITIONS: tuple[Partition, ...] = ("train", "val", "test")


class DataError(ValueError):
    """Bad data or a bad data request; the message is one line: the problem and what would be valid."""


# --- § 1 Episode ---------------------------------------------------------------------------------


@typechecked
@dataclass(frozen=True)
class Episode:
    """One few-shot task. Images are float32, ImageNet-normalised; labels are 0..n_way-1."""

    support_images: Float[Tensor, "n_support channels height width"]
    support_labels: Int[Tensor, " n_support"]
    query_images: Float[Tensor, "n_query channels height width"]
    query_labels: Int[Tensor, " n_query"]
    domain: str
    split: Split

    @property
    def n_way(self) -> int:
        return int(self.support_labels.max()) + 1

    def to(self, device: torch.device | str) -> "Episode":
        return replace(
            self,
            support_images=self.support_images.to(device, non_blocking=True),
            support_labels=self.support_labels.to(device, non_blocking=True),
            query_images=self.query_images.to(device, non_blocking=True),
            query_labels=self.query_labels.to(device, non_blocking=True),
        )

    def pin_memory(self) -> "Episode":
        """The same episode in page-locked memory (DataLoader's pin_memory calls this)."""
        return replace(self, support_images=self.support_images.pin_memory(),
                       support_labels=self.support_labels.pin_memory(),
                       query_images=self.query_images.pin_memory(), query_labels=self.query_labels.pin_memory())


# --- § 2 Samplers [MD sampling.py] ----------------------------------------------------------------
# Meta-Dataset's episode, in the steps the comments below number: (1) a source, uniformly among the
# ID sources (training) or the one being tested; (2) the classes (ways); (3) one query count for all
# classes; (4) the support-set size; (5) the shots of each class; (6) the images, each class shuffled,
# support first, then query. Steps 2-5 make an `EpisodePlan` (here); 1 and 6 are § 3's.

MIN_WAYS = 5  # [MD data_config_common.gin] min_ways
MAX_WAYS_UPPER_BOUND = 50  # max_ways_upper_bound
MAX_NUM_QUERY = 10  # max_num_query
MAX_SUPPORT_SET_SIZE = 500  # max_support_set_size
MAX_SUPPORT_SIZE_CONTRIB_PER_CLASS = 100  # max_support_size_contrib_per_class
MIN_LOG_WEIGHT, MAX_LOG_WEIGHT = math.log(0.5), math.log(2.0)  # class weights are log-uniform
MAX_SPANNING_LEAVES_ELIGIBLE = 392  # [MD sampling.py] ImageNet nodes spanning more leaves are skipped


@dataclass(frozen=True)
class Protocol:
    """How episodes are shaped: fixed N-way K-shot Q-query, or Meta-Dataset's variable way/shot."""

    kind: Literal["fixed", "variable"]
    ways: int = 5  # the three counts are used by "fixed" only
    shots: int = 5
    queries: int = 15


def protocol(cfg, stage: Literal["train", "test"]) -> Protocol:
    """The episode shape a smat.Config asks for in meta-training ("train") or in validation and testing ("test")."""
    if stage == "train":
        return Protocol(cfg.train_protocol, cfg.train_ways, cfg.train_shots, cfg.train_queries)
    return Protocol(cfg.test_protocol, cfg.test_ways, cfg.test_shots, cfg.test_queries)


@dataclass(frozen=True)
class EpisodePlan:
    """Which classes (indices into the partition's class list), shots per class, queries per class."""

    classes: tuple[int, ...]
    shots: tuple[int, ...]
    queries: int


@dataclass(frozen=True)
class Hierarchy:
    """Class groups a source offers the variable sampler [MD sampling.py].

    "bilevel" (Omniglot): one group per alphabet; an episode draws its classes from one group.
    "dag" (ImageNet): the leaves spanned by every internal WordNet node; an episode takes all leaves of
    one eligible node. Group members are indices into the partition's class list.
    """

    kind: Literal["bilevel", "dag"]
    groups: tuple[tuple[int, ...], ...]


def dag_hierarchy(children: Mapping[str, Sequence[str]], leaf_class: Mapping[str, int]) -> Hierarchy:
    """The "dag" hierarchy of a graph given as node -> children; `leaf_class` maps leaves to classes."""
    spanned: dict[str, frozenset[int]] = {}

    def leaves_under(node: str) -> frozenset[int]:
        if node not in spanned:
            kids = children.get(node, ())
            spanned[node] = (
                frozenset().union(*(leaves_under(k) for k in kids)) if kids else frozenset({leaf_class[node]})
            )
        return spanned[node]

    internal = sorted(node for node, kids in children.items() if kids)  # sorted: deterministic order
    return Hierarchy("dag", tuple(tuple(sorted(leaves_under(node))) for node in internal))


def sample_fixed_plan(
    class_sizes: Sequence[int], ways: int, shots: int, queries: int, rng: np.random.Generator
) -> EpisodePlan:
    """N-way K-shot Q-query: `ways` classes uniformly without replacement [MD fixed_way_and_shot.gin]."""
    if ways > len(class_sizes):
        raise DataError(f"{ways}-way episodes need {ways} classes but this partition has {len(class_sizes)}; "
                        f"use at most {len(class_sizes)} ways")
    smallest = int(np.argmin(class_sizes))
    if class_sizes[smallest] < shots + queries:
        raise DataError(f"class {smallest} has {class_sizes[smallest]} images, fewer than shots + queries = "
                        f"{shots + queries}; use shots + queries <= {class_sizes[smallest]}")
    classes = rng.choice(len(class_sizes), size=ways, replace=False)
    return EpisodePlan(tuple(int(c) for c in classes), (shots,) * ways, queries)


def sample_variable_plan(
    class_sizes: Sequence[int], rng: np.random.Generator, hierarchy: Hierarchy | None = None
) -> EpisodePlan:
    """Meta-Dataset v1's variable-way variable-shot episode, steps 2-5 of § 2's header."""
    # Step 2: the classes (ways).
    if hierarchy is not None and hierarchy.kind == "dag":
        eligible = [g for g in hierarchy.groups if MIN_WAYS <= len(g) <= MAX_SPANNING_LEAVES_ELIGIBLE]
        if not eligible:
            raise DataError(f"no hierarchy node spans {MIN_WAYS}..{MAX_SPANNING_LEAVES_ELIGIBLE} classes; "
                            f"the DAG sampler needs at least one")
        node = eligible[rng.integers(len(eligible))]
        picked = rng.choice(node, MAX_WAYS_UPPER_BOUND, replace=False) if len(node) > MAX_WAYS_UPPER_BOUND else node
    else:
        pool = np.arange(len(class_sizes))
        if hierarchy is not None:  # bilevel: one superclass (alphabet) uniformly, then ways within it
            pool = np.asarray(hierarchy.groups[rng.integers(len(hierarchy.groups))])
        if len(pool) < MIN_WAYS:
            raise DataError(f"variable-way episodes need at least {MIN_WAYS} classes to choose from, got "
                            f"{len(pool)}; use a partition (or alphabet) with >= {MIN_WAYS} classes")
        ways = rng.integers(MIN_WAYS, min(MAX_WAYS_UPPER_BOUND, len(pool)) + 1)
        picked = rng.choice(pool, ways, replace=False)
    classes = np.asarray(picked, dtype=np.int64)
    sizes = np.asarray(class_sizes, dtype=np.int64)[classes]
    if sizes.min() < 2:
        raise DataError(f"class {int(classes[sizes.argmin()])} has {int(sizes.min())} image(s); "
                        f"variable-shot episodes need at least 2 per class")
    # Step 3: the same query count for every class, at most half of the smallest class.
    queries = int(min(MAX_NUM_QUERY, sizes.min() // 2))
    remaining = sizes - queries
    # Step 4: support-set size S; floor(beta * contrib + 1) >= 1 per class, so S >= ways.
    beta = rng.uniform()
    contrib = np.minimum(MAX_SUPPORT_SIZE_CONTRIB_PER_CLASS, remaining)
    support_size = int(min(MAX_SUPPORT_SET_SIZE, np.floor(beta * contrib + 1).sum()))
    # Step 5: shots proportional to n_c * exp(u_c), u_c ~ U(ln 0.5, ln 2); one shot guaranteed per class.
    weights = sizes * np.exp(rng.uniform(MIN_LOG_WEIGHT, MAX_LOG_WEIGHT, size=len(sizes)))
    proportions = weights / weights.sum()
    shots = np.minimum(np.floor(proportions * (support_size - len(sizes))).astype(np.int64) + 1, remaining)
    return EpisodePlan(tuple(int(c) for c in classes), tuple(int(k) for k in shots), queries)


def sample_plan(source: "Source", partition: Partition, protocol: Protocol, rng: np.random.Generator) -> EpisodePlan:
    """The plan `protocol` asks for on one partition of one source (fixed mode ignores hierarchies)."""
    sizes = source.class_sizes(partition)
    if protocol.kind == "fixed":
        return sample_fixed_plan(sizes, protocol.ways, protocol.shots, protocol.queries, rng)
    return sample_variable_plan(sizes, rng, source.hierarchy(partition))


# --- § 3 Episodes from plans ---------------------------------------------------------------------


class Source:
    """One domain. Subclasses say how many images each class has and how to load some of them.

    `load` returns uint8 RGB at the source's load size; `make_episode` does the rest (crop, resize,
    augmentation, normalisation) on tensors for every source alike.
    """

    name: str
    split: Split
    distance: OODDistance | None = None  # near or far OOD, where the source's design says so
    test_crop: float = 1.0  # fraction of the side kept by the test-time centre crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of the training random-resized crop

    def class_sizes(self, partition: Partition) -> list[int]:
        raise NotImplementedError

    def hierarchy(self, partition: Partition) -> Hierarchy | None:
        return None

    def class_names(self, partition: Partition) -> list[str]:
        """What identifies each class of a partition (folder names, class ids), in class-index order:
        a run records them (data.json) and refuses data whose classes have changed since."""
        return [str(i) for i in range(len(self.class_sizes(partition)))]

    def load(
        self, partition: Partition, class_index: int, image_indices: Sequence[int], image_size: int
    ) -> UInt8[Tensor, "n 3 height width"]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r})"


def normalise(images: Float[Tensor, "n 3 height width"], in_place: bool = False) -> Float[Tensor, "n 3 height width"]:
    """(images - mean) / std with ImageNet's statistics; `in_place` overwrites `images` (same bits)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std) if in_place else (images - mean) / std


def _test_transform(images: Tensor, test_crop: float, image_size: int) -> Tensor:
    """Deterministic centre crop of `test_crop` of the side, then an antialiased resize [PMF: 146 -> 128]."""
    side = images.shape[-1]
    keep = max(1, round(side * test_crop))
    start = (side - keep) // 2
    images = images[..., start:start + keep, start:start + keep]
    if keep != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False)
    return images


def _train_transform(images: Tensor, rng: np.random.Generator, crop_scale: tuple[float, float],
                     image_size: int) -> Tensor:
    """[SMAT dataset.py train transform] random-resized crop + flip (one affine grid per image) and
    brightness / contrast / saturation jitter of +-0.4, all vectorised over the episode.
    (torchvision applies the jitters in a random order; here the order is fixed.)"""
    n = images.shape[0]
    area = rng.uniform(*crop_scale, size=n)
    log_ratio = rng.uniform(math.log(3 / 4), math.log(4 / 3), size=n)
    width = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)  # fractions of the side
    height = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
    centre_x = rng.uniform(-1, 1, size=n) * (1 - width)
    centre_y = rng.uniform(-1, 1, size=n) * (1 - height)
    flip = np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(torch.from_numpy(theta), [n, 3, image_size, image_size], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness, contrast, saturation = (torch.from_numpy(rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(np.float32))
                                        for _ in range(3))
    # In place on grid_sample's fresh output: the same element-wise operations in the same order as
    # ((x * b).clamp(0, 1) - m) * c + m ..., so the same bits, without a new episode-sized tensor
    # (and its page faults) per operation.
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    images.mul_(brightness).clamp_(0, 1)
    mean_gray = (images * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    images.sub_(mean_gray).mul_(contrast).add_(mean_gray).clamp_(0, 1)
    gray = (images * luma).sum(1, keepdim=True)
    return images.sub_(gray).mul_(saturation).add_(gray).clamp_(0, 1)


def make_episode(source: Source, partition: Partition, plan: EpisodePlan, rng: np.random.Generator,
                 augment: bool, image_size: int) -> Episode:
    """Read the plan's images: shuffle each class, take support then query [MD step 6], relabel 0..ways-1."""
    sizes = source.class_sizes(partition)
    support, query, support_labels, query_labels = [], [], [], []
    for label, (cls, shots) in enumerate(zip(plan.classes, plan.shots)):
        if shots + plan.queries > sizes[cls]:
            raise DataError(f"class {cls} of {source.name}/{partition} has {sizes[cls]} images, fewer than "
                            f"shots + queries = {shots + plan.queries}; lower the shots or queries")
        order = rng.permutation(sizes[cls])[: shots + plan.queries]
        images = source.load(partition, cls, order.tolist(), image_size)
        support.append(images[:shots])
        query.append(images[shots:])
        support_labels += [label] * shots
        query_labels += [label] * plan.queries
    images = torch.cat(support + query).float().div_(255)
    if augment:  # a new tensor, normalised in place
        images = normalise(_train_transform(images, rng, source.crop_scale, image_size), in_place=True)
    else:  # may be a view of `images`
        images = normalise(_test_transform(images, source.test_crop, image_size))
    n_support = len(support_labels)
    return Episode(images[:n_support], torch.tensor(support_labels), images[n_support:], torch.tensor(query_labels),
                   source.name, source.split)


def _id_sources(sources: Sequence[Source]) -> list[Source]:
    id_sources = [s for s in sources if s.split == "id"]
    if not id_sources:
        raise DataError(f"no ID source among {[s.name for s in sources]}; mark at least one with @id")
    return id_sources


def training_episode(sources: Sequence[Source], protocol: Protocol, seed: int, index: int,
                     image_size: int) -> Episode:
    """Episode `index` of the meta-training stream: a pure function of (seed, index), so a resumed or
    data-parallel run sees exactly the episodes of an uninterrupted one. The source is picked uniformly
    among the ID sources [SMAT meta_h5_dataset.py; MD step 1], the plan from its TRAIN classes."""
    rng = np.random.default_rng([seed, index])
    id_sources = _id_sources(sources)
    source = id_sources[rng.integers(len(id_sources))]
    return make_episode(source, "train", sample_plan(source, "train", protocol, rng), rng, True, image_size)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Make tensors with one intra-op thread, then restore the caller's setting.

    Episodes are always made this way, in a worker process or in the main one, so their bits never
    depend on where they were made or on the machine's thread count; and on a busy machine a second
    team of OpenMP threads fighting the training step's made episodes 30x slower (docs/benchmark.md).
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class TrainingEpisodes(Dataset):
    """`training_episode` as a map-style dataset: index -> episode, made with one intra-op thread.

    A DataError (an unreadable image, say) is returned, not raised: `training_stream` raises it
    with its own one-line message, where DataLoader would wrap it in a worker's traceback.
    """

    def __init__(self, sources: Sequence[Source], protocol: Protocol, seed: int, image_size: int) -> None:
        _id_sources(sources)  # fail here, not in a worker
        self.sources, self.protocol, self.seed, self.image_size = list(sources), protocol, seed, image_size

    def __getitem__(self, index: int) -> Episode | DataError:
        try:
            with one_intra_op_thread():
                return training_episode(self.sources, self.protocol, self.seed, index, self.image_size)
        except DataError as error:
            return error


@contextmanager
def training_stream(sources: Sequence[Source], protocol: Protocol, seed: int, image_size: int, *, start: int,
                    count: int, stride: int = 1, workers: int = 0, pin_memory: bool = False,
                    prefetch: int = 2) -> Iterator[Iterator[Episode]]:
    """The meta-training episodes start, start + stride, ... (`count` of them), in that order, made by
    `workers` processes (0: by the calling process, when asked for). Use as `with ... as episodes`.

    Episode i is `training_episode(seed, i)`, so the tensors are the same bits whatever `workers`
    is; only where and when they are made changes. A torch DataLoader over `TrainingEpisodes`, one
    episode per item: every worker runs `prefetch` episodes ahead, so shared memory holds up to
    workers x prefetch episodes (a 400-image Meta-Dataset episode at 128 px is 80 MB of float32);
    `pin_memory` (CUDA) lets `Episode.to(device)` copy asynchronously. Workers are forked where the
    platform can (the sources are shared copy-on-write, never pickled; where it cannot, as on
    Windows, use workers=0) and live for this one pass over the indices (persistent workers would
    only serve a second pass, which training never makes); on leaving the `with` (the end, an error,
    Ctrl-C) they stop at once. The loader draws its worker seeds from its own generator, not from
    torch's global one, which the run's model uses.
    """
    context = "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None
    loader = DataLoader(
        TrainingEpisodes(sources, protocol, seed, image_size), batch_size=None,
        sampler=range(start, start + count * stride, stride), num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None, multiprocessing_context=context,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=quiet_sharing_threads if workers else None)
    items = iter(loader)

    def episodes() -> Iterator[Episode]:
        for item in items:
            if isinstance(item, DataError):
                raise item
            yield item

    try:
        yield episodes()
    finally:
        shutdown = getattr(items, "_shutdown_workers", None)  # DataLoader's own clean-up, with workers
        if shutdown is not None:
            shutdown()


def quiet_sharing_threads(worker_id: int) -> None:
    """In a data worker: a worker hands each episode's tensors over through a file-descriptor-sharing
    thread (multiprocessing.resource_sharer), which prints a traceback when the training process drops
    a transfer half-way because it is stopping (Ctrl-C). The training process says why it stopped, in
    one line; so a connection error in a thread of a worker is not printed. Anything else still is."""
    default = sys.excepthook

    def hook(kind, value, traceback) -> None:
        if threading.current_thread() is threading.main_thread() or not issubclass(kind, (ConnectionError, EOFError)):
            default(kind, value, traceback)

    sys.excepthook = hook


def evaluation_episodes(source: Source, partition: Literal["val", "test"], protocol: Protocol, n_episodes: int,
                  seed: int, image_size: int) -> Iterator[Episode]:
    """`n_episodes` deterministic, un-augmented episodes: episode i depends only on (seed, source, i),
    so every method is evaluated on the same tasks [MD: 600 test episodes per source]."""
    domain_key = zlib.crc32(source.name.encode())
    for index in range(n_episodes):
        rng = np.random.default_rng([seed, domain_key, index])
        yield make_episode(source, partition, sample_plan(source, partition, protocol, rng), rng, False, image_size)


def default_cache_dir() -> Path:
    """$SMAT_CACHE if set, else ~/.cache/smat."""
    return Path(os.environ.get("SMAT_CACHE") or Path.home() / ".cache" / "smat")


def split_counts(n_classes: int, fractions: tuple[float, float] = (0.64, 0.16)) -> tuple[int, int, int]:
    """Class counts (train, val, test) in Meta-Learning's 64/16/20 proportions [miniImageNet split]."""
    n_train, n_val = round(n_classes * fractions[0]), round(n_classes * fractions[1])
    return n_train, n_val, n_classes - n_train - n_val
