"""Episodes for SMAT: the Episode type, Meta-Dataset's samplers, and every image source behind them.

Reading order: § 1 `Episode` (what every other module consumes) -> § 2 the samplers, pure functions
of (class sizes, hierarchy, random generator) that return an `EpisodePlan` [MD sampling.py] -> § 3
`make_episode`, `training_episode`, `TrainStream`, `test_episodes` (plans turned into tensors) ->
§ 4 the embedded procedural benchmark, the default `--data` (DESIGN §4) -> § 5 real sources: image
folders, torchvision datasets, Meta-Dataset in PMF's h5 layout -> § 6 `parse_data_spec`, the one
string syntax for all of them.

The protocol facts (query rule, support budget, log-uniform class weights, Omniglot and ImageNet
hierarchies) follow Meta-Dataset v1 (Triantafillou et al., ICLR 2020), re-implemented from
shared/reference/ecosystem.md §1.6; no Meta-Dataset, PMF or SMAT code is copied.
"""

import contextlib
import hashlib
import json
import math
import os
import queue
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, UInt8, jaxtyped
from PIL import Image, UnidentifiedImageError
from torch import Tensor

typechecked = jaxtyped(typechecker=beartype)  # JAXTYPING_DISABLE=1 turns all checks off

Split = Literal["id", "ood"]
Partition = Literal["train", "val", "test"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics DINO and PMF normalise with [PMF datasets]
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
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


# --- § 2 Samplers [MD sampling.py; ecosystem.md §1.6] --------------------------------------------

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
    """Meta-Dataset v1's variable-way variable-shot episode, steps 2-5 of ecosystem.md §1.6."""
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
    test_crop: float = 1.0  # fraction of the side kept by the test-time centre crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of the training random-resized crop

    def class_sizes(self, partition: Partition) -> list[int]:
        raise NotImplementedError

    def hierarchy(self, partition: Partition) -> Hierarchy | None:
        return None

    def load(
        self, partition: Partition, class_index: int, image_indices: Sequence[int], image_size: int
    ) -> UInt8[Tensor, "n 3 height width"]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r})"


def _normalise(images: Float[Tensor, "n 3 height width"]) -> Float[Tensor, "n 3 height width"]:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


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
    images = (images * brightness).clamp(0, 1)
    gray = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    images = ((images - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)).clamp(0, 1)
    gray = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return ((images - gray) * saturation + gray).clamp(0, 1)


def make_episode(source: Source, partition: Partition, plan: EpisodePlan, rng: np.random.Generator,
                 augment: bool, image_size: int) -> Episode:
    """Read the plan's images: shuffle each class, take support then query [MD §1.6 step 6], relabel 0..ways-1."""
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
    images = (_train_transform(images, rng, source.crop_scale, image_size) if augment
              else _test_transform(images, source.test_crop, image_size))
    images = _normalise(images)
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
    among the ID sources [SMAT meta_h5_dataset.py; MD §1.6 step 1], the plan from its TRAIN classes."""
    rng = np.random.default_rng([seed, index])
    id_sources = _id_sources(sources)
    source = id_sources[rng.integers(len(id_sources))]
    return make_episode(source, "train", sample_plan(source, "train", protocol, rng), rng, True, image_size)


class TrainStream:
    """training_episode(seed, i) for i = start, start + stride, ... made ahead in a background thread.

    The thread runs `prefetch` episodes ahead (tensor work releases the GIL), so a training step never
    waits on data. It uses one intra-op thread (thread-local under PyTorch's OpenMP backend): on a
    2-core machine a second team of OpenMP threads fighting the training step's made episodes 30x
    slower (docs/benchmark.md). Use as a context manager or call close(). An error in the worker is
    re-raised here.
    """

    def __init__(self, sources: Sequence[Source], protocol: Protocol, seed: int, image_size: int,
                 start: int = 0, stride: int = 1, prefetch: int = 8) -> None:
        _id_sources(sources)  # fail here, not in the worker
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(list(sources), protocol, seed, image_size, start, stride), daemon=True)
        self._thread.start()

    def _work(self, sources, protocol, seed, image_size, start, stride) -> None:
        torch.set_num_threads(1)
        index = start
        while not self._stop.is_set():
            try:
                item: Episode | BaseException = training_episode(sources, protocol, seed, index, image_size)
            except BaseException as error:  # handed to the consumer, which re-raises it
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            index += stride

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Episode:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def test_episodes(source: Source, partition: Literal["val", "test"], protocol: Protocol, n_episodes: int,
                  seed: int, image_size: int) -> Iterator[Episode]:
    """`n_episodes` deterministic, un-augmented episodes: episode i depends only on (seed, source, i),
    so every method is evaluated on the same tasks [MD: 600 test episodes per source]."""
    domain_key = zlib.crc32(source.name.encode())
    for index in range(n_episodes):
        rng = np.random.default_rng([seed, domain_key, index])
        yield make_episode(source, partition, sample_plan(source, partition, protocol, rng), rng, False, image_size)


test_episodes.__test__ = False  # a library function, not a pytest test


def default_cache_dir() -> Path:
    """$SMAT_CACHE if set, else ~/.cache/smat."""
    return Path(os.environ.get("SMAT_CACHE") or Path.home() / ".cache" / "smat")


def split_counts(n_classes: int, fractions: tuple[float, float] = (0.64, 0.16)) -> tuple[int, int, int]:
    """Class counts (train, val, test) in Meta-Learning's 64/16/20 proportions [miniImageNet split]."""
    n_train, n_val = round(n_classes * fractions[0]), round(n_classes * fractions[1])
    return n_train, n_val, n_classes - n_train - n_val


# --- § 4 The embedded benchmark (DESIGN §4) ------------------------------------------------------
# Eight procedural domains. A class is a random *structure* (strokes, frequencies, a silhouette, dot
# positions, a motif ...); an instance re-draws the *nuisances* (pose, scale, position, colours,
# jitter of the structure, pixel noise). Colours are random per instance in every domain, so no
# domain can be solved by colour alone and all share low-level statistics (strokes, edges, colour
# blobs) that a pretrained backbone can transfer. The OOD domains recombine those statistics into
# structures the ID domains never show: closed curves, radial/spiral patterns, cell mosaics.

EMBEDDED_VERSION = 1  # bump when a renderer changes: it is part of the cache file name


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    centres = ((np.arange(res, dtype=np.float32) + 0.5) / res) * 2 - 1  # pixel centres in [-1, 1]
    x, y = np.meshgrid(centres, centres)
    return x, y


def _pose(rng: np.random.Generator, n: int, rotate: float, scale: tuple[float, float], shift: float) -> np.ndarray:
    """Per-instance similarity transforms as rows (angle, scale, dx, dy)."""
    return np.stack([rng.uniform(-rotate, rotate, n), rng.uniform(*scale, n),
                     rng.uniform(-shift, shift, n), rng.uniform(-shift, shift, n)], 1).astype(np.float32)


def _object_coords(pose: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres mapped into each instance's object frame: (n, res, res) each."""
    x, y = _grid(res)
    angle, scale, dx, dy = (pose[:, i, None, None] for i in range(4))
    xs, ys = x[None] - dx, y[None] - dy
    return ((np.cos(angle) * xs + np.sin(angle) * ys) / scale, (-np.sin(angle) * xs + np.cos(angle) * ys) / scale)


def _colour_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random light ink on a random dark background (per instance): colour is a nuisance, but the
    contrast keeps the structure what dominates a pixel distance."""
    ink = rng.uniform(0.55, 1.0, (n, 3)).astype(np.float32)
    return ink, rng.uniform(0.0, 0.35, (n, 3)).astype(np.float32)


def _segment_distance(x: np.ndarray, y: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from pixels (n, h, w) to segments (n, s, 2) -> (n, s, h, w)."""
    px, py = x[:, None], y[:, None]
    ax, ay = start[..., 0, None, None], start[..., 1, None, None]
    bx, by = end[..., 0, None, None], end[..., 1, None, None]
    vx, vy = bx - ax, by - ay
    t = np.clip(((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy + 1e-8), 0, 1)
    return np.hypot(px - ax - t * vx, py - ay - t * vy)


def _soft(inside_margin: np.ndarray, res: int) -> np.ndarray:
    """Anti-aliased coverage from a signed margin (positive inside), one pixel of ramp."""
    return np.clip(inside_margin * res / 2 + 0.5, 0, 1)


def _glyphs(rng, n_classes, n_images, res):
    """Stroke glyphs, Omniglot-like: a class is 3-4 strokes, most starting where an earlier one ends."""
    n_strokes = 4
    points = rng.uniform(-0.65, 0.65, (n_classes, n_strokes + 1, 2))
    starts, ends = points[:, :-1].copy(), points[:, 1:].copy()
    branch = rng.uniform(size=(n_classes, n_strokes)) < 0.35  # some strokes start at a random earlier point
    for s in range(1, n_strokes):
        pick = rng.integers(0, s + 1, n_classes)
        starts[:, s] = np.where(branch[:, s, None], points[np.arange(n_classes), pick], starts[:, s])
    keep = np.ones((n_classes, n_strokes), bool)
    keep[:, -1] = rng.uniform(size=n_classes) < 0.5  # 3 or 4 strokes
    n = n_classes * n_images
    jitter = lambda a: np.repeat(a, n_images, 0) + rng.normal(0, 0.05, (n, n_strokes, 2))  # noqa: E731
    start, end = jitter(starts), jitter(ends)
    width = rng.uniform(0.06, 0.1, (n, 1, 1, 1))
    mask_keep = np.repeat(keep, n_images, 0)[..., None, None]

    def render(pose, start, end, width, mask_keep):
        x, y = _object_coords(pose, res)
        return (_soft(width - _segment_distance(x, y, start, end), res) * mask_keep).max(1)

    pose = _pose(rng, n, 0.4, (0.8, 1.1), 0.18)
    return _chunks(render, pose, start, end, width, mask_keep)


def _gratings(rng, n_classes, n_images, res):
    """Oriented textures: a class is two sinusoidal gratings (orientation, frequency, contrast ratio);
    instances shift their phases, wobble orientation and frequency, and recolour."""
    theta = rng.uniform(0, np.pi, (n_classes, 2))
    freq = rng.uniform(1.0, 4.0, (n_classes, 2))  # cycles per half image
    ratio = rng.uniform(0.3, 1.0, n_classes)
    n = n_classes * n_images
    theta = np.repeat(theta, n_images, 0) + rng.normal(0, 0.1, (n, 2))
    freq = np.repeat(freq, n_images, 0) * rng.uniform(0.93, 1.07, (n, 2))
    phase = rng.uniform(-2.2, 2.2, (n, 2))
    ratio = np.repeat(ratio, n_images, 0)

    def render(theta, freq, phase, ratio):
        x, y = _grid(res)
        wave = [np.sin(np.pi * freq[:, i, None, None] * (x * np.cos(theta[:, i, None, None])
                                                         + y * np.sin(theta[:, i, None, None])) + phase[:, i, None, None])
                for i in range(2)]
        return 0.5 + 0.5 * (wave[0] + ratio[:, None, None] * wave[1]) / (1 + ratio[:, None, None])

    return _chunks(render, theta, freq, phase, ratio)


def _shapes(rng, n_classes, n_images, res):
    """Filled silhouettes: a class is a radius profile R(phi) = r0 (1 + sum_k a_k cos(k phi + p_k))."""
    orders = np.arange(2, 6)
    amp = rng.uniform(0, 0.22, (n_classes, len(orders))) * (rng.uniform(size=(n_classes, len(orders))) < 0.7)
    phase = rng.uniform(0, 2 * np.pi, (n_classes, len(orders)))
    hole = rng.uniform(size=n_classes) < 0.3  # some classes are rings
    n = n_classes * n_images
    amp, phase = np.repeat(amp, n_images, 0), np.repeat(phase, n_images, 0)
    amp = amp * rng.uniform(0.85, 1.15, amp.shape)
    hole = np.repeat(hole, n_images, 0)

    def render(pose, amp, phase, hole):
        x, y = _object_coords(pose, res)
        r, phi = np.hypot(x, y), np.arctan2(y, x)
        profile = 0.55 * (1 + (amp[:, :, None, None] * np.cos(orders[None, :, None, None] * phi[:, None]
                                                                + phase[:, :, None, None])).sum(1))
        filled = _soft(profile - r, res)
        return np.where(hole[:, None, None], filled * _soft(r - 0.45 * profile, res), filled)

    pose = _pose(rng, n, 0.5, (0.75, 1.1), 0.15)
    return _chunks(render, pose, amp, phase, hole)


def _constellations(rng, n_classes, n_images, res):
    """Dot constellations: a class is 5-7 dots (positions and radii); instances jitter every dot."""
    n_dots = 7
    centres = rng.uniform(-0.7, 0.7, (n_classes, n_dots, 2))
    radius = rng.uniform(0.07, 0.15, (n_classes, n_dots))
    present = rng.uniform(size=(n_classes, n_dots)) < 0.8
    present[:, :5] = True
    n = n_classes * n_images
    centres = np.repeat(centres, n_images, 0) + rng.normal(0, 0.04, (n, n_dots, 2))
    radius = np.repeat(radius, n_images, 0) * rng.uniform(0.85, 1.15, (n, n_dots))
    present = np.repeat(present, n_images, 0)

    def render(pose, centres, radius, present):
        x, y = _object_coords(pose, res)
        dist = np.hypot(x[:, None] - centres[..., 0, None, None], y[:, None] - centres[..., 1, None, None])
        return (_soft(radius[..., None, None] - dist, res) * present[..., None, None]).max(1)

    pose = _pose(rng, n, 0.4, (0.85, 1.1), 0.15)
    return _chunks(render, pose, centres, radius, present)


def _tilings(rng, n_classes, n_images, res):
    """Periodic tilings: a class is a 3x3 or 4x4 binary motif and a tile size; instances translate and
    slightly rotate the tiling."""
    side = rng.choice([3, 4], n_classes)
    bits = rng.uniform(size=(n_classes, 4, 4)) < 0.5
    bits[:, 0, 0], bits[:, 1, 1] = True, False  # never a blank tile
    tile = rng.uniform(0.7, 1.1, n_classes)
    n = n_classes * n_images
    side, bits, tile = np.repeat(side, n_images), np.repeat(bits, n_images, 0), np.repeat(tile, n_images)
    pose = _pose(rng, n, 0.15, (0.95, 1.05), 0.4)

    def render(pose, side, bits, tile):
        x, y = _object_coords(pose, res)
        cell = lambda u: np.floor(((u / tile[:, None, None]) % 1.0) * side[:, None, None]).astype(np.int64)  # noqa: E731
        return bits[np.arange(len(side))[:, None, None], cell(y), cell(x)].astype(np.float32)

    return _chunks(render, pose, side, bits, tile)


def _curves(rng, n_classes, n_images, res):
    """OOD: Lissajous curves x = A sin(a t + d), y = B sin(b t) drawn as strokes (strokes, but closed
    and curved, unlike the ID glyphs). Rasterised by splatting dense points on a 4x grid, dilating
    (the stroke width) and average-pooling back (anti-aliasing): O(points), not O(points x pixels)."""
    a, b = rng.integers(1, 5, n_classes), rng.integers(1, 5, n_classes)
    delta = rng.uniform(0, np.pi, n_classes)
    amp = rng.uniform(0.45, 0.75, (n_classes, 2))
    n = n_classes * n_images
    t = np.linspace(0, 2 * np.pi, 8 * res)
    a, b, delta = np.repeat(a, n_images), np.repeat(b, n_images), np.repeat(delta, n_images) + rng.normal(0, 0.1, n)
    amp = np.repeat(amp, n_images, 0) * rng.uniform(0.9, 1.1, (n, 2))
    obj_x = amp[:, 0, None] * np.sin(a[:, None] * t + delta[:, None])  # (n, points)
    obj_y = amp[:, 1, None] * np.sin(b[:, None] * t)
    angle, scale, dx, dy = (v[:, None] for v in _pose(rng, n, 0.7, (0.8, 1.1), 0.2).T)
    # object -> image coordinates: the inverse of _object_coords' map
    px = scale * (np.cos(angle) * obj_x - np.sin(angle) * obj_y) + dx
    py = scale * (np.sin(angle) * obj_x + np.cos(angle) * obj_y) + dy
    fine = 4 * res
    col = np.clip(((px + 1) / 2 * fine).astype(np.int64), 0, fine - 1)
    row = np.clip(((py + 1) / 2 * fine).astype(np.int64), 0, fine - 1)
    canvas = np.zeros((n, fine * fine), np.float32)
    np.put_along_axis(canvas, row * fine + col, 1.0, axis=1)
    canvas = torch.from_numpy(canvas).view(n, 1, fine, fine)
    width = max(3, round(0.1 * fine / 2) | 1)  # odd kernel, a stroke ~0.1 units wide
    canvas = F.max_pool2d(canvas, width, stride=1, padding=width // 2)
    return F.avg_pool2d(canvas, 4)[:, 0].numpy()


def _rosettes(rng, n_classes, n_images, res):
    """OOD: radial and spiral patterns cos(2 pi f r + k phi + s r) (oriented texture, but polar)."""
    k = rng.integers(2, 9, n_classes).astype(np.float32)
    f = rng.uniform(1.0, 3.5, n_classes)
    twist = rng.uniform(-5, 5, n_classes)
    n = n_classes * n_images
    k, f, twist = np.repeat(k, n_images), np.repeat(f, n_images), np.repeat(twist, n_images)
    f = f * rng.uniform(0.93, 1.07, n)
    phase = rng.uniform(-1.0, 1.0, n)

    def render(pose, k, f, twist, phase):
        x, y = _object_coords(pose, res)
        r, phi = np.hypot(x, y), np.arctan2(y, x)
        c = lambda v: v[:, None, None]  # noqa: E731
        return 0.5 + 0.5 * np.cos(2 * np.pi * c(f) * r + c(k) * phi + c(twist) * r + c(phase))

    pose = _pose(rng, n, 0.25, (0.9, 1.1), 0.12)
    return _chunks(render, pose, k, f, twist, phase)


def _mosaics(rng, n_classes, n_images, res):
    """OOD: Voronoi mosaics, a class is 6 seeds with a shade per cell; borders are drawn as lines."""
    n_seeds = 6
    seeds = rng.uniform(-0.8, 0.8, (n_classes, n_seeds, 2))
    shade = rng.uniform(0, 1, (n_classes, n_seeds))
    n = n_classes * n_images
    seeds = np.repeat(seeds, n_images, 0) + rng.normal(0, 0.12, (n, n_seeds, 2))
    shade = np.clip(np.repeat(shade, n_images, 0) + rng.normal(0, 0.15, (n, n_seeds)), 0, 1)

    def render(pose, seeds, shade):
        x, y = _object_coords(pose, res)
        dist = np.hypot(x[:, None] - seeds[..., 0, None, None], y[:, None] - seeds[..., 1, None, None])
        order = np.argsort(dist, axis=1)[:, :2]
        nearest = np.take_along_axis(dist, order, 1)
        value = np.take_along_axis(shade[..., None, None], order[:, :1], 1)[:, 0]
        border = _soft(0.05 - (nearest[:, 1] - nearest[:, 0]), res)
        return value * (1 - border)

    pose = _pose(rng, n, 0.7, (0.85, 1.1), 0.3)
    return _chunks(render, pose, seeds, shade)


def _chunks(render: Callable[..., np.ndarray], *per_image: np.ndarray, size: int = 256) -> np.ndarray:
    """Call a vectorised renderer on blocks of images so the (n, parts, h, w) temporaries stay small."""
    n = len(per_image[0])
    return np.concatenate([render(*(a[i:i + size] for a in per_image)) for i in range(0, n, size)])


# name -> (renderer, split). Five ID domains (meta-training), three OOD (test only). The stand-in
# backbone never saw any of them: it is pretrained on standin.py's disjoint procedural corpus.
EMBEDDED_DOMAINS: dict[str, tuple[Callable, Split]] = {
    "glyphs": (_glyphs, "id"),
    "gratings": (_gratings, "id"),
    "shapes": (_shapes, "id"),
    "constellations": (_constellations, "id"),
    "tilings": (_tilings, "id"),
    "curves": (_curves, "ood"),
    "rosettes": (_rosettes, "ood"),
    "mosaics": (_mosaics, "ood"),
}


def _render_domain(name: str, seed: int, n_classes: int, n_images: int, res: int) -> np.ndarray:
    """uint8 images (classes, images, 3, res, res): a coverage map coloured with per-instance ink and
    background, plus pixel noise. Each domain has its own generator, so domains are independent."""
    index = list(EMBEDDED_DOMAINS).index(name)
    rng = np.random.default_rng([seed, index])
    coverage = EMBEDDED_DOMAINS[name][0](rng, n_classes, n_images, res).astype(np.float32)  # (n, res, res)
    n = n_classes * n_images
    ink, background = _colour_pairs(rng, n)
    images = coverage[:, None] * ink[:, :, None, None] + (1 - coverage[:, None]) * background[:, :, None, None]
    images += rng.normal(0, 0.04, images.shape).astype(np.float32)
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(n_classes, n_images, 3, res, res)


def _digest(domains: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(domains):
        digest.update(name.encode())
        digest.update(domains[name].numpy().tobytes())
    return digest.hexdigest()


def build_embedded(seed: int = 0, resolution: int = 32, n_classes: int = 100, n_images: int = 20,
                   cache_dir: Path | None = None) -> dict[str, Tensor]:
    """All embedded domains as uint8 tensors (classes, images, 3, resolution, resolution).

    Cached under cache_dir/embedded/; a cache whose key, shapes or SHA-256 does not match (partial
    write, corruption, older renderer) is rebuilt. Writes are atomic (temporary file, then rename).
    """
    if n_classes < 3 or n_images < 2:
        raise DataError(f"the embedded benchmark needs >= 3 classes and >= 2 images per class, got "
                        f"{n_classes} and {n_images}")
    key = f"v{EMBEDDED_VERSION}-seed{seed}-res{resolution}-{n_classes}x{n_images}"
    path = (cache_dir or default_cache_dir()) / "embedded" / f"{key}.pt"
    try:
        cached = torch.load(path, weights_only=True)
        domains = cached["domains"]
        if (cached["key"] == key and sorted(domains) == sorted(EMBEDDED_DOMAINS)
                and all(d.shape == (n_classes, n_images, 3, resolution, resolution) and d.dtype == torch.uint8
                        for d in domains.values())
                and cached["sha256"] == _digest(domains)):
            return domains
    except Exception:  # missing, truncated or unreadable: any of them means "build it again"
        pass
    domains = {name: torch.from_numpy(_render_domain(name, seed, n_classes, n_images, resolution))
               for name in EMBEDDED_DOMAINS}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, "domains": domains, "sha256": _digest(domains)}, temporary)
    os.replace(temporary, path)
    return domains


class EmbeddedSource(Source):
    """One embedded domain held in memory; classes [0, n_train) are train, then val, then test."""

    crop_scale = (0.5, 1.0)  # milder than ImageNet's 0.08: a 32-px glyph cropped to 8% loses its class

    def __init__(self, name: str, images: UInt8[Tensor, "classes images 3 height width"], split: Split) -> None:
        self.name, self.split, self._images = name, split, images
        counts = split_counts(images.shape[0])
        starts = np.cumsum((0,) + counts)
        self._ranges = {p: (int(starts[i]), int(starts[i + 1])) for i, p in enumerate(PARTITIONS)}

    def classes(self, partition: Partition) -> range:
        """Absolute class ids of a partition (disjoint by construction)."""
        return range(*self._ranges[partition])

    def class_sizes(self, partition: Partition) -> list[int]:
        return [self._images.shape[1]] * len(self.classes(partition))

    def load(self, partition, class_index, image_indices, image_size):
        return self._images[self.classes(partition)[class_index], list(image_indices)]


def embedded_sources(seed: int = 0, resolution: int = 32, n_classes: int = 100, n_images: int = 20,
                     cache_dir: Path | None = None) -> list[Source]:
    """The embedded benchmark's domains as sources (built or read from the cache)."""
    domains = build_embedded(seed, resolution, n_classes, n_images, cache_dir)
    return [EmbeddedSource(name, domains[name], split) for name, (_, split) in EMBEDDED_DOMAINS.items()]


# --- § 5 Real sources: image folders, torchvision datasets, Meta-Dataset h5 ------------------------


def _square(image: Image.Image, side: int) -> UInt8[Tensor, "3 side side"]:
    """RGB, shorter side resized to `side` (PIL's antialiased bilinear), centre-cropped to a square."""
    image = image.convert("RGB")
    scale = side / min(image.size)
    width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class ImageListSource(Source):
    """A source whose classes are lists of items that `read` turns into PIL images (photos).

    Images are loaded at side round(image_size / test_crop): at test time the centre `test_crop` of
    it is kept, which is PMF's resize 146 -> centre crop 128 at image_size 128 [PMF datasets].
    """

    test_crop = 224 / 256

    def __init__(self, name: str, split: Split, partitions: Mapping[Partition, Sequence[Sequence[object]]],
                 read: Callable[[object], Image.Image],
                 hierarchies: Mapping[Partition, Hierarchy] | None = None) -> None:
        self.name, self.split, self._read = name, split, read
        self._classes = {p: [list(c) for c in partitions.get(p, [])] for p in PARTITIONS}
        self._hierarchies = dict(hierarchies or {})

    def class_sizes(self, partition: Partition) -> list[int]:
        return [len(c) for c in self._classes[partition]]

    def hierarchy(self, partition: Partition) -> Hierarchy | None:
        return self._hierarchies.get(partition)

    def load(self, partition, class_index, image_indices, image_size):
        side = round(image_size / self.test_crop)
        items = self._classes[partition][class_index]
        return torch.stack([_square(self._read(items[i]), side) for i in image_indices])


def _open_image(path: Path) -> Image.Image:
    """Decode one image file fully, or name it in a DataError."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"image file {path} is empty; remove it or replace it with a valid image")
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read image {path} ({type(error).__name__}); remove it or replace it with a "
                        f"valid {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file") from None


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_partition(names: Sequence[str], split: Split, seed: int, domain: str,
                     split_file: Path) -> dict[Partition, list[str]]:
    """Class names per partition: from `split_file` ({"train": [...], "val": [...], "test": [...]}) if it
    exists; else a seeded 64/16/20 partition of the sorted names, or all in test for an OOD source
    (as Meta-Dataset's test-only sources)."""
    if split_file.is_file():
        try:
            listed = json.loads(split_file.read_text())
            chosen = {p: [str(c) for c in listed.get(p, [])] for p in PARTITIONS}
        except (ValueError, AttributeError, TypeError) as error:
            raise DataError(f"split file {split_file} is not valid JSON of the form "
                            f'{{"train": [...], "val": [...], "test": [...]}} ({error})') from None
        unknown = sorted(set(sum(chosen.values(), [])) - set(names))
        if unknown:
            raise DataError(f"split file {split_file} names classes with no image folder: {unknown[:5]}; "
                            f"valid names are the class folder names")
        return chosen
    if split == "ood":
        return {"train": [], "val": [], "test": list(names)}
    order = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(len(names))
    n_train, n_val, _ = split_counts(len(names))
    shuffled = [names[i] for i in order]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def folder_sources(root: Path, split: Split | None = None, seed: int = 0) -> list[Source]:
    """ROOT/<class>/*.png (one domain named after ROOT) or ROOT/<domain>/<class>/*.png (one per domain).
    An optional splits.json in a domain folder fixes its class split."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected ROOT/<class>/<images> or "
                        f"ROOT/<domain>/<class>/<images>")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    domains = [root] if any(_image_files(d) for d in subdirs) else [d for d in subdirs if any(
        sub.is_dir() and _image_files(sub) for sub in d.iterdir())]
    if not domains:
        raise DataError(f"no class folders with images under {root}; expected ROOT/<class>/<images> with "
                        f"suffixes {', '.join(IMAGE_SUFFIXES)}")
    sources: list[Source] = []
    for domain in domains:
        files = {d.name: _image_files(d) for d in sorted(domain.iterdir()) if d.is_dir()}
        empty = [name for name, paths in files.items() if not paths]
        if empty:  # a class that silently vanished would change the class split and the episodes
            raise DataError(f"class folder {domain / empty[0]} has no images; add images with suffixes "
                            f"{', '.join(IMAGE_SUFFIXES)} or remove the folder")
        zero = next((path for paths in files.values() for path in paths if path.stat().st_size == 0), None)
        if zero is not None:  # caught here, before a run directory exists, not at its first episode
            raise DataError(f"image file {zero} is empty; remove it or replace it with a valid image")
        chosen = _class_partition(sorted(files), split or "id", seed, domain.name, domain / "splits.json")
        partitions = {p: [files[name] for name in chosen[p]] for p in PARTITIONS}
        sources.append(ImageListSource(domain.name, split or "id", partitions, _open_image))
    return sources


def _present(path: str | Path, md5: str | None = None) -> bool:
    """Stands in for torchvision's check_integrity when reading from ROOT: a file counts as present if it,
    or the folder its archive extracts to, exists. The MD5s guard downloads, and hashing gigabytes
    (or lacking the archive one extracted) should not stop a local read."""
    return os.path.isfile(path) or os.path.isdir(os.path.splitext(path)[0])


# name -> (torchvision class, constructor arguments of each part to concatenate)
TORCHVISION_DATASETS: dict[str, tuple[str, tuple[dict, ...]]] = {
    "omniglot": ("Omniglot", ({"background": True}, {"background": False})),
    "cifar10": ("CIFAR10", ({"train": True}, {"train": False})),
    "cifar100": ("CIFAR100", ({"train": True}, {"train": False})),
    "mnist": ("MNIST", ({"train": True}, {"train": False})),
    "fashionmnist": ("FashionMNIST", ({"train": True}, {"train": False})),
    "fgvc_aircraft": ("FGVCAircraft", ({"split": "trainval"}, {"split": "test"})),
    "dtd": ("DTD", ({"split": "train"}, {"split": "val"}, {"split": "test"})),
    "flowers102": ("Flowers102", ({"split": "train"}, {"split": "val"}, {"split": "test"})),
    "gtsrb": ("GTSRB", ({"split": "train"},)),  # Meta-Dataset uses the Final_Training images only
}
# Class counts (train, val, test) as in Meta-Dataset v1 [ecosystem.md §1.1]; the classes themselves
# are a seeded partition (the split JSONs are not shipped). Absent: test-only, like MD's extra OOD sources.
MD_CLASS_COUNTS = {"fgvc_aircraft": (70, 15, 15), "dtd": (33, 7, 7), "flowers102": (71, 15, 16)}
# Meta-Dataset's five validation alphabets, carved out of Omniglot's background set [MD omniglot split]
OMNIGLOT_VALID_ALPHABETS = frozenset({
    "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog", "Alphabet_of_the_Magi"})


def _open_torchvision(name: str, root: Path, arguments: dict):
    import torchvision.datasets

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name][0])
    module = sys.modules[cls.__module__]
    try:  # first read what is under ROOT, without the download-integrity hashes
        with (mock.patch.object(module, "check_integrity", _present) if hasattr(module, "check_integrity")
              else contextlib.nullcontext()):
            return cls(str(root), download=False, **arguments)
    except Exception:
        pass
    try:
        return cls(str(root), download=True, **arguments)
    except Exception as error:
        raise DataError(f"torchvision dataset {name} is not under {root} and could not be downloaded "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"put it there or allow network access") from None


def _torchvision_labels(dataset) -> list[int]:
    """Labels without decoding images, from whichever attribute this dataset class keeps them in."""
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    if hasattr(dataset, "_labels"):
        return [int(t) for t in dataset._labels]
    if hasattr(dataset, "_samples"):
        return [int(t) for _, t in dataset._samples]
    if hasattr(dataset, "_flat_character_images"):
        return [int(t) for _, t in dataset._flat_character_images]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def torchvision_source(name: str, root: Path, split: Split | None = None, seed: int = 0) -> Source:
    """A torchvision dataset as a class-split source; Omniglot keeps MD's alphabet split and hierarchy."""
    if name not in TORCHVISION_DATASETS:
        raise DataError(f"unknown torchvision dataset {name!r}; valid: {', '.join(TORCHVISION_DATASETS)}")
    parts = [_open_torchvision(name, root, arguments) for arguments in TORCHVISION_DATASETS[name][1]]
    # class key -> items; Omniglot's two parts have separate label spaces, the others share one
    classes: dict[tuple[int, int], list[tuple[object, int]]] = {}
    for part_index, dataset in enumerate(parts):
        for item, label in enumerate(_torchvision_labels(dataset)):
            key = (part_index if name == "omniglot" else 0, label)
            classes.setdefault(key, []).append((dataset, item))
    keys = sorted(classes)
    hierarchies: dict[Partition, Hierarchy] = {}
    if name == "omniglot":
        alphabet = {key: Path(parts[key[0]]._characters[key[1]]).parts[0] for key in keys}
        chosen = {"train": [k for k in keys if k[0] == 0 and alphabet[k] not in OMNIGLOT_VALID_ALPHABETS],
                  "val": [k for k in keys if k[0] == 0 and alphabet[k] in OMNIGLOT_VALID_ALPHABETS],
                  "test": [k for k in keys if k[0] == 1]}
        for partition, members in chosen.items():
            groups: dict[str, list[int]] = {}
            for position, key in enumerate(members):
                groups.setdefault(alphabet[key], []).append(position)
            if members:
                hierarchies[partition] = Hierarchy("bilevel", tuple(tuple(g) for g in groups.values()))
    else:
        n_train, n_val, _ = MD_CLASS_COUNTS.get(name, (0, 0, len(keys)))
        if name in MD_CLASS_COUNTS and len(keys) != sum(MD_CLASS_COUNTS[name]):
            n_train, n_val, _ = split_counts(len(keys))  # a partial copy of the dataset
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(keys))
        shuffled = [keys[i] for i in order]
        chosen = {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
                  "test": sorted(shuffled[n_train + n_val:])}

    def read(item: object) -> Image.Image:
        dataset, index = item
        try:
            return dataset[index][0]
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"cannot read image {index} of torchvision {name} under {root} "
                            f"({type(error).__name__}); the copy there is damaged") from None

    default_split: Split = "id" if chosen["train"] else "ood"
    return ImageListSource(name, split or default_split, {p: [classes[k] for k in chosen[p]] for p in PARTITIONS},
                           read, hierarchies)


def _per_split(mapping: Mapping[str, object], partition: Partition) -> object:
    """A Meta-Dataset spec value keyed by split, whatever spelling the key has (TRAIN, Split.TRAIN ...)."""
    wanted = {"train": "TRAIN", "val": "VALID", "test": "TEST"}[partition]
    for key, value in mapping.items():
        if str(key).upper().split(".")[-1] == wanted:
            return value
    return 0


class H5Files:
    """At most `max_open` h5 files open at once (least recently used closed first), so Meta-Dataset's
    thousands of per-class files need no raised `ulimit -n` [PMF #18; SMAT README]."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()  # the training thread and the main thread may both read

    def read(self, path: Path, record: int) -> np.ndarray:
        import h5py

        with self._lock:
            try:
                handle = self._open.pop(path, None) or h5py.File(path, "r")
                self._open[path] = handle
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)[1].close()
                return handle[str(record)]["image"][()]
            except (OSError, KeyError) as error:
                raise DataError(f"cannot read record {record} of {path} ({type(error).__name__}); expected "
                                f"PMF's layout: one group per image holding an 'image' dataset") from None

    def __len__(self) -> int:
        return len(self._open)


def h5_source(directory: Path, split: Split | None = None, max_open: int = 64) -> Source:
    """One Meta-Dataset source in PMF's h5 layout [ecosystem.md §1.3]: DIR/dataset_spec.json and one
    DIR/<class_id>.h5 per class. Class ids are contiguous: train first, then valid, then test.
    Omniglot's spec gives alphabets (bilevel hierarchy); ImageNet's its WordNet DAG per split."""
    try:
        import h5py  # noqa: F401  (optional extra)
    except ImportError:
        raise DataError("h5 sources need h5py; install it with pip install 'smat-reference[h5]'") from None
    spec_path = directory / "dataset_spec.json"
    if not spec_path.is_file():
        raise DataError(f"{spec_path} does not exist; expected a Meta-Dataset source folder in PMF's h5 layout")
    try:
        spec = json.loads(spec_path.read_text())
        counts = [int(_per_split(spec["classes_per_split"], p)) for p in PARTITIONS]
        per_class = spec["images_per_class"]
        if any(str(k).upper().split(".")[-1] in ("TRAIN", "VALID", "TEST") for k in per_class):
            per_class = {k: v for p in PARTITIONS for k, v in dict(_per_split(per_class, p) or {}).items()}
        sizes = [int(per_class[str(c)] if str(c) in per_class else per_class[c]) for c in range(sum(counts))]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{spec_path} is not a Meta-Dataset dataset_spec.json ({type(error).__name__}: {error}); "
                        f"expected classes_per_split and images_per_class") from None
    starts = np.cumsum([0] + counts)
    files = H5Files(max_open)
    partitions = {p: [[(directory / f"{c}.h5", i) for i in range(sizes[c])]
                      for c in range(int(starts[k]), int(starts[k + 1]))] for k, p in enumerate(PARTITIONS)}
    hierarchies: dict[Partition, Hierarchy] = {}
    if "classes_per_superclass" in spec:  # Omniglot: superclasses and their classes are contiguous
        per_superclass = [int(spec["classes_per_superclass"][str(s)] if str(s) in spec["classes_per_superclass"]
                              else spec["classes_per_superclass"][s]) for s in range(len(spec["classes_per_superclass"]))]
        super_counts = [int(_per_split(spec["superclasses_per_split"], p)) for p in PARTITIONS]
        super_starts = np.cumsum([0] + super_counts)
        for k, p in enumerate(PARTITIONS):
            groups, position = [], 0
            for s in range(int(super_starts[k]), int(super_starts[k + 1])):
                groups.append(tuple(range(position, position + per_superclass[s])))
                position += per_superclass[s]
            if groups:
                hierarchies[p] = Hierarchy("bilevel", tuple(groups))
    if "split_subgraphs" in spec:  # ImageNet: nodes with wn_id and children_ids; leaves are classes
        wn_to_class = {str(v): int(k) for k, v in spec["class_names"].items()}
        for k, p in enumerate(PARTITIONS):
            nodes = _per_split(spec["split_subgraphs"], p) or []
            children = {node["wn_id"]: list(node.get("children_ids", [])) for node in nodes}
            leaf_class = {wn: wn_to_class[wn] - int(starts[k]) for wn, kids in children.items() if not kids}
            if children:
                hierarchies[p] = dag_hierarchy(children, leaf_class)

    def read(item: object) -> Image.Image:
        path, record = item
        return Image.fromarray(files.read(path, record))

    default_split: Split = "id" if counts[0] else "ood"
    source = ImageListSource(directory.name, split or default_split, partitions, read, hierarchies)
    source.files = files  # exposed so callers (and tests) can see how many handles are open
    return source


# --- § 6 One string for all sources --------------------------------------------------------------

EMBEDDED_SEED = 0  # the benchmark itself is fixed, like Meta-Dataset; run seeds do not change it


def parse_data_spec(spec: str, image_size: int, cache_dir: Path | None = None, seed: int = 0) -> list[Source]:
    """Sources named by one string: "embedded" (default; or "embedded:NAME" for one domain),
    "folder:PATH", "torchvision:NAME:ROOT", "h5:PATH/SOURCE", joined by commas, each optionally
    ending in "@id" or "@ood". Without a mark, embedded domains keep their own split and real sources
    are ID when they have train classes, OOD otherwise. `seed` fixes seeded class splits of folders and
    torchvision datasets; keep it constant to compare runs."""
    if image_size < 8:
        raise DataError(f"image size {image_size} is too small; use at least 8 pixels")
    sources: list[Source] = []
    for part in (p.strip() for p in spec.split(",")):
        body, mark = (part.rsplit("@", 1) + [""])[:2] if "@" in part else (part, "")
        if mark not in ("", "id", "ood"):
            raise DataError(f"unknown split mark @{mark} in {part!r}; use @id or @ood")
        split: Split | None = mark or None
        kind, _, rest = body.partition(":")
        if kind == "embedded":
            found = embedded_sources(EMBEDDED_SEED, cache_dir=cache_dir)
            if rest:
                found = [s for s in found if s.name == rest]
                if not found:
                    raise DataError(f"unknown embedded domain {rest!r}; valid: {', '.join(EMBEDDED_DOMAINS)}")
            for source in found:
                source.split = split or source.split
        elif kind == "folder" and rest:
            found = folder_sources(Path(rest).expanduser(), split, seed)
        elif kind == "torchvision" and ":" in rest:
            name, _, root = rest.partition(":")
            found = [torchvision_source(name.lower(), Path(root).expanduser(), split, seed)]
        elif kind == "h5" and rest:
            found = [h5_source(Path(rest).expanduser(), split)]
        else:
            raise DataError(f"cannot parse data source {part!r}; use embedded, embedded:NAME, folder:PATH, "
                            f"torchvision:NAME:ROOT or h5:PATH/SOURCE, optionally ending in @id or @ood")
        sources += found
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data sources have repeated names {sorted(n for n in set(names) if names.count(n) > 1)}; "
                        f"give each source its own folder name")
    return sources
