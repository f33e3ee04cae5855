"""The embedded benchmark: eight procedural image domains, a Meta-Dataset in miniature with no download.

It is the default `--data`. Five ID domains are meta-trained on (their train classes) and validated
on (their val classes); three OOD domains are only tested. Each domain has 100 classes of 20 images
(32 px by default), split 64/16/20 into train/val/test classes like data.split_counts. The benchmark
is fixed (`EMBEDDED_SEED`), built once and cached under $SMAT_CACHE/embedded/ (docs/benchmark.md shows
and measures it).

Reading order: the shared geometry (pixel grids, poses, segments, soft edges; standin.py draws its
corpus with them too), then one renderer per domain, `EMBEDDED_DOMAINS`, and `build_embedded` /
`EmbeddedSource` / `embedded_sources`, the domains as `data.Source`s.
"""

import errno
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import UInt8
from torch import Tensor

from data import PARTITIONS, DataError, OODDistance, Partition, Source, Split, default_cache_dir, split_counts

EMBEDDED_SEED = 0  # the benchmark itself is fixed, like Meta-Dataset; run seeds do not change it

# Eleven procedural domains. A class is a random *structure* (strokes, frequencies, a silhouette,
# dot positions, a motif ...); an instance re-draws the *nuisances* (pose, scale, position, colours,
# jitter of the structure, pixel noise). Colours are random per instance in every domain, so no
# domain can be solved by colour alone and all share low-level statistics (strokes, edges, colour
# blobs) that a pretrained backbone can transfer. The far-OOD domains recombine those statistics into
# structures the ID domains never show: closed curves, radial/spiral patterns, cell mosaics. The
# near-OOD domains redraw an ID structure with another renderer (see "Near-OOD domains" below).

EMBEDDED_VERSION = 2  # bump when a renderer changes: it is part of the cache file name


def pixel_grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of every pixel centre of a res × res image, in [-1, 1]: (res, res) each."""
    centres = ((np.arange(res, dtype=np.float32) + 0.5) / res) * 2 - 1  # pixel centres in [-1, 1]
    x, y = np.meshgrid(centres, centres)
    return x, y


def random_poses(rng: np.random.Generator, n: int, rotate: float, scale: tuple[float, float],
                 shift: float) -> np.ndarray:
    """Per-instance similarity transforms as rows (angle, scale, dx, dy)."""
    return np.stack([rng.uniform(-rotate, rotate, n), rng.uniform(*scale, n),
                     rng.uniform(-shift, shift, n), rng.uniform(-shift, shift, n)], 1).astype(np.float32)


def object_coords(pose: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres mapped into each instance's object frame: (n, res, res) each."""
    x, y = pixel_grid(res)
    angle, scale, dx, dy = (pose[:, i, None, None] for i in range(4))
    xs, ys = x[None] - dx, y[None] - dy
    return ((np.cos(angle) * xs + np.sin(angle) * ys) / scale, (-np.sin(angle) * xs + np.cos(angle) * ys) / scale)


def _colour_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random light ink on a random dark background (per instance): colour is a nuisance, but the
    contrast keeps the structure what dominates a pixel distance."""
    ink = rng.uniform(0.55, 1.0, (n, 3)).astype(np.float32)
    return ink, rng.uniform(0.0, 0.35, (n, 3)).astype(np.float32)


def segment_distance(x: np.ndarray, y: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from pixels (n, h, w) to segments (n, s, 2) -> (n, s, h, w)."""
    px, py = x[:, None], y[:, None]
    ax, ay = start[..., 0, None, None], start[..., 1, None, None]
    bx, by = end[..., 0, None, None], end[..., 1, None, None]
    vx, vy = bx - ax, by - ay
    t = np.clip(((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy + 1e-8), 0, 1)
    return np.hypot(px - ax - t * vx, py - ay - t * vy)


def soft_edge(inside_margin: np.ndarray, res: int) -> np.ndarray:
    """Anti-aliased coverage from a signed margin (positive inside), one pixel of ramp."""
    return np.clip(inside_margin * res / 2 + 0.5, 0, 1)


def in_chunks(render: Callable[..., np.ndarray], *per_image: np.ndarray, size: int = 256) -> np.ndarray:
    """Call a vectorised renderer on blocks of images so the (n, parts, h, w) temporaries stay small."""
    n = len(per_image[0])
    return np.concatenate([render(*(a[i:i + size] for a in per_image)) for i in range(0, n, size)])


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
        x, y = object_coords(pose, res)
        return (soft_edge(width - segment_distance(x, y, start, end), res) * mask_keep).max(1)

    pose = random_poses(rng, n, 0.4, (0.8, 1.1), 0.18)
    return in_chunks(render, pose, start, end, width, mask_keep)


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
        x, y = pixel_grid(res)
        wave = [np.sin(np.pi * freq[:, i, None, None] * (x * np.cos(theta[:, i, None, None])
                                                         + y * np.sin(theta[:, i, None, None])) + phase[:, i, None, None])
                for i in range(2)]
        return 0.5 + 0.5 * (wave[0] + ratio[:, None, None] * wave[1]) / (1 + ratio[:, None, None])

    return in_chunks(render, theta, freq, phase, ratio)


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
        x, y = object_coords(pose, res)
        r, phi = np.hypot(x, y), np.arctan2(y, x)
        profile = 0.55 * (1 + (amp[:, :, None, None] * np.cos(orders[None, :, None, None] * phi[:, None]
                                                                + phase[:, :, None, None])).sum(1))
        filled = soft_edge(profile - r, res)
        return np.where(hole[:, None, None], filled * soft_edge(r - 0.45 * profile, res), filled)

    pose = random_poses(rng, n, 0.5, (0.75, 1.1), 0.15)
    return in_chunks(render, pose, amp, phase, hole)


def point_layouts(rng: np.random.Generator, n_classes: int, n_images: int,
                  sizes: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A class is 5-7 points (positions and sizes in `sizes`); an instance jitters every point and
    rescales it: (centres (n, 7, 2), size (n, 7), present (n, 7)) over n = n_classes·n_images images."""
    n_dots = 7
    centres = rng.uniform(-0.7, 0.7, (n_classes, n_dots, 2))
    size = rng.uniform(*sizes, (n_classes, n_dots))
    present = rng.uniform(size=(n_classes, n_dots)) < 0.8
    present[:, :5] = True
    n = n_classes * n_images
    centres = np.repeat(centres, n_images, 0) + rng.normal(0, 0.04, (n, n_dots, 2))
    size = np.repeat(size, n_images, 0) * rng.uniform(0.85, 1.15, (n, n_dots))
    return centres, size, np.repeat(present, n_images, 0)


def _constellations(rng, n_classes, n_images, res):
    """Dot constellations: a class is 5-7 dots (positions and radii); instances jitter every dot."""
    centres, radius, present = point_layouts(rng, n_classes, n_images, (0.07, 0.15))

    def render(pose, centres, radius, present):
        x, y = object_coords(pose, res)
        dist = np.hypot(x[:, None] - centres[..., 0, None, None], y[:, None] - centres[..., 1, None, None])
        return (soft_edge(radius[..., None, None] - dist, res) * present[..., None, None]).max(1)

    pose = random_poses(rng, len(present), 0.4, (0.85, 1.1), 0.15)
    return in_chunks(render, pose, centres, radius, present)


def _tilings(rng, n_classes, n_images, res):
    """Periodic tilings: a class is a 3x3 or 4x4 binary motif and a tile size; instances translate and
    slightly rotate the tiling."""
    side = rng.choice([3, 4], n_classes)
    bits = rng.uniform(size=(n_classes, 4, 4)) < 0.5
    bits[:, 0, 0], bits[:, 1, 1] = True, False  # never a blank tile
    tile = rng.uniform(0.7, 1.1, n_classes)
    n = n_classes * n_images
    side, bits, tile = np.repeat(side, n_images), np.repeat(bits, n_images, 0), np.repeat(tile, n_images)
    pose = random_poses(rng, n, 0.15, (0.95, 1.05), 0.4)

    def render(pose, side, bits, tile):
        x, y = object_coords(pose, res)
        cell = lambda u: np.floor(((u / tile[:, None, None]) % 1.0) * side[:, None, None]).astype(np.int64)  # noqa: E731
        return bits[np.arange(len(side))[:, None, None], cell(y), cell(x)].astype(np.float32)

    return in_chunks(render, pose, side, bits, tile)


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
    angle, scale, dx, dy = (v[:, None] for v in random_poses(rng, n, 0.7, (0.8, 1.1), 0.2).T)
    # object -> image coordinates: the inverse of object_coords' map
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
        x, y = object_coords(pose, res)
        r, phi = np.hypot(x, y), np.arctan2(y, x)
        c = lambda v: v[:, None, None]  # noqa: E731
        return 0.5 + 0.5 * np.cos(2 * np.pi * c(f) * r + c(k) * phi + c(twist) * r + c(phase))

    pose = random_poses(rng, n, 0.25, (0.9, 1.1), 0.12)
    return in_chunks(render, pose, k, f, twist, phase)


def _mosaics(rng, n_classes, n_images, res):
    """OOD: Voronoi mosaics, a class is 6 seeds with a shade per cell; borders are drawn as lines."""
    n_seeds = 6
    seeds = rng.uniform(-0.8, 0.8, (n_classes, n_seeds, 2))
    shade = rng.uniform(0, 1, (n_classes, n_seeds))
    n = n_classes * n_images
    seeds = np.repeat(seeds, n_images, 0) + rng.normal(0, 0.12, (n, n_seeds, 2))
    shade = np.clip(np.repeat(shade, n_images, 0) + rng.normal(0, 0.15, (n, n_seeds)), 0, 1)

    def render(pose, seeds, shade):
        x, y = object_coords(pose, res)
        dist = np.hypot(x[:, None] - seeds[..., 0, None, None], y[:, None] - seeds[..., 1, None, None])
        order = np.argsort(dist, axis=1)[:, :2]
        nearest = np.take_along_axis(dist, order, 1)
        value = np.take_along_axis(shade[..., None, None], order[:, :1], 1)[:, 0]
        border = soft_edge(0.05 - (nearest[:, 1] - nearest[:, 0]), res)
        return value * (1 - border)

    pose = random_poses(rng, n, 0.7, (0.85, 1.1), 0.3)
    return in_chunks(render, pose, seeds, shade)


# Near-OOD domains [project design, docs/benchmark.md "Near and far OOD"]: each takes the class-defining
# structure of one ID domain and draws it with another renderer (another primitive, straight edges
# instead of smooth ones, another polarity), so it shares no class and no rendering with that domain
# but rewards what meta-tuning learned there: the role MNIST plays beside Omniglot in Meta-Dataset.


def bezier_points(start: np.ndarray, control: np.ndarray, end: np.ndarray, pieces: int) -> np.ndarray:
    """Points along quadratic Bézier strokes (..., 2) -> (..., pieces + 1, 2)."""
    t = np.linspace(0, 1, pieces + 1)[:, None]
    a, c, b = (v[..., None, :] for v in (start, control, end))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * c + t ** 2 * b


def _scripts(rng, n_classes, n_images, res):
    """Near OOD to glyphs: a class is 2-4 *curved* pen strokes (quadratic Béziers, the next starting
    where the previous ends), thinner than glyphs' straight bars, drawn dark on light (the polarity
    flip is applied by EMBEDDED_DOMAINS)."""
    n_strokes, pieces = 4, 6
    points = rng.uniform(-0.6, 0.6, (n_classes, n_strokes + 1, 2))
    bend = rng.normal(0, 0.45, (n_classes, n_strokes, 2))
    keep = np.ones((n_classes, n_strokes), bool)
    keep[:, 2] = rng.uniform(size=n_classes) < 0.8
    keep[:, 3] = keep[:, 2] & (rng.uniform(size=n_classes) < 0.5)
    n = n_classes * n_images
    rep = lambda a: np.repeat(a, n_images, 0)  # noqa: E731
    points = rep(points) + rng.normal(0, 0.04, (n, n_strokes + 1, 2))
    start, end = points[:, :-1], points[:, 1:]
    control = (start + end) / 2 + rep(bend) * 0.5 + rng.normal(0, 0.04, (n, n_strokes, 2))
    path = bezier_points(start, control, end, pieces)  # (n, strokes, pieces + 1, 2)
    seg_start = path[:, :, :-1].reshape(n, -1, 2)
    seg_end = path[:, :, 1:].reshape(n, -1, 2)
    seg_keep = np.repeat(rep(keep), pieces, 1)[..., None, None]
    width = rng.uniform(0.045, 0.07, (n, 1, 1, 1))

    def render(pose, seg_start, seg_end, width, seg_keep):
        x, y = object_coords(pose, res)
        return (soft_edge(width - segment_distance(x, y, seg_start, seg_end), res) * seg_keep).max(1)

    pose = random_poses(rng, n, 0.3, (0.8, 1.1), 0.15)
    return in_chunks(render, pose, seg_start, seg_end, width, seg_keep, size=128)


def _stars(rng, n_classes, n_images, res):
    """Near OOD to shapes: a class is a filled star polygon, 5-8 vertices at random radii joined by
    straight edges (the radius interpolated linearly in angle between vertices), where shapes fills
    smooth Fourier silhouettes."""
    max_vertices = 8
    n_vertices = rng.integers(5, max_vertices + 1, n_classes)
    radii = rng.uniform(0.3, 0.75, (n_classes, max_vertices))
    offset = rng.uniform(0, 2 * np.pi, n_classes)
    n = n_classes * n_images
    n_vertices, offset = np.repeat(n_vertices, n_images), np.repeat(offset, n_images)
    radii = np.repeat(radii, n_images, 0) * rng.uniform(0.9, 1.1, (n, max_vertices))

    def render(pose, n_vertices, offset, radii):
        x, y = object_coords(pose, res)
        r, phi = np.hypot(x, y), np.arctan2(y, x)
        count = n_vertices[:, None, None]
        position = ((phi - offset[:, None, None]) % (2 * np.pi)) / (2 * np.pi) * count  # in vertex steps
        vertex = np.floor(position).astype(np.int64)
        between = position - vertex
        image = np.arange(len(n_vertices))[:, None, None]
        boundary = radii[image, vertex % count] * (1 - between) + radii[image, (vertex + 1) % count] * between
        return soft_edge(boundary - r, res)

    pose = random_poses(rng, n, 0.5, (0.8, 1.1), 0.15)
    return in_chunks(render, pose, n_vertices, offset, radii)


def _specks(rng, n_classes, n_images, res):
    """Near OOD to constellations: a class is 5-7 points, each drawn as a small filled square turned
    with the pose instead of a disc, dark on light (the polarity flip is applied by EMBEDDED_DOMAINS)."""
    centres, size, present = point_layouts(rng, n_classes, n_images, (0.06, 0.12))  # size: half the side

    def render(pose, centres, size, present):
        x, y = object_coords(pose, res)
        box = np.maximum(np.abs(x[:, None] - centres[..., 0, None, None]),
                         np.abs(y[:, None] - centres[..., 1, None, None]))  # L∞ distance: a square
        return (soft_edge(size[..., None, None] - box, res) * present[..., None, None]).max(1)

    pose = random_poses(rng, len(present), 0.4, (0.85, 1.1), 0.15)
    return in_chunks(render, pose, centres, size, present)


class Domain(NamedTuple):
    render: Callable[..., np.ndarray]  # (rng, n_classes, n_images, res) -> coverage (n, res, res) in [0, 1]
    split: Split
    distance: OODDistance | None = None  # for OOD domains: near (shares an ID structure) or far
    dark_on_light: bool = False  # polarity: ink darker than the background, unlike the ID domains


# Five ID domains (meta-training), three far-OOD and three near-OOD domains (test only). The stand-in
# backbone never saw any of them: it is pretrained on standin.py's disjoint procedural corpus. New
# domains go last: each domain's generator is seeded by its position, so earlier ones stay the same.
EMBEDDED_DOMAINS: dict[str, Domain] = {
    "glyphs": Domain(_glyphs, "id"),
    "gratings": Domain(_gratings, "id"),
    "shapes": Domain(_shapes, "id"),
    "constellations": Domain(_constellations, "id"),
    "tilings": Domain(_tilings, "id"),
    "curves": Domain(_curves, "ood", "far"),
    "rosettes": Domain(_rosettes, "ood", "far"),
    "mosaics": Domain(_mosaics, "ood", "far"),
    "scripts": Domain(_scripts, "ood", "near", dark_on_light=True),  # near glyphs
    "stars": Domain(_stars, "ood", "near"),  # near shapes
    "specks": Domain(_specks, "ood", "near", dark_on_light=True),  # near constellations
}


def _render_domain(name: str, seed: int, n_classes: int, n_images: int, res: int) -> np.ndarray:
    """uint8 images (classes, images, 3, res, res): a coverage map coloured with per-instance ink and
    background, plus pixel noise. Each domain has its own generator, so domains are independent."""
    index = list(EMBEDDED_DOMAINS).index(name)
    rng = np.random.default_rng([seed, index])
    domain = EMBEDDED_DOMAINS[name]
    coverage = domain.render(rng, n_classes, n_images, res).astype(np.float32)  # (n, res, res)
    if domain.dark_on_light:
        coverage = 1 - coverage
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
    try:  # a cache that cannot be written fails here, before minutes of rendering
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise IsADirectoryError(errno.EISDIR, "not a file", str(path))
    except OSError as error:
        raise _cache_error(path, error) from None
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
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save({"key": key, "domains": domains, "sha256": _digest(domains)}, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # a full disk, a folder put in the entry's place meanwhile
        temporary.unlink(missing_ok=True)
        raise _cache_error(path, error) from None
    return domains


def _cache_error(path: Path, error: Exception) -> DataError:
    """SMAT_CACHE naming a file, a folder in a cache entry's place, a full disk: one line."""
    why = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return DataError(f"cannot use the benchmark cache {path} ({why}); remove what is in the way or set SMAT_CACHE "
                     f"to a writable directory")


class EmbeddedSource(Source):
    """One embedded domain held in memory; classes [0, n_train) are train, then val, then test."""

    crop_scale = (0.5, 1.0)  # milder than ImageNet's 0.08: a 32-px glyph cropped to 8% loses its class

    def __init__(self, name: str, images: UInt8[Tensor, "classes images 3 height width"], split: Split) -> None:
        self.name, self.split, self._images = name, split, images
        counts = split_counts(images.shape[0])
        starts = np.cumsum((0,) + counts)
        self._ranges = {p: (int(starts[i]), int(starts[i + 1])) for i, p in enumerate(PARTITIONS)}

    @property
    def distance(self) -> OODDistance | None:
        """near or far, as designed, while the domain is tested as OOD (`embedded:NAME@id` makes it ID)."""
        return EMBEDDED_DOMAINS[self.name].distance if self.split == "ood" else None

    def classes(self, partition: Partition) -> range:
        """Absolute class ids of a partition (disjoint by construction)."""
        return range(*self._ranges[partition])

    def class_sizes(self, partition: Partition) -> list[int]:
        return [self._images.shape[1]] * len(self.classes(partition))

    def class_names(self, partition: Partition) -> list[str]:
        return [str(c) for c in self.classes(partition)]

    def load(self, partition, class_index, image_indices, image_size):
        return self._images[self.classes(partition)[class_index], list(image_indices)]


def embedded_sources(seed: int = 0, resolution: int = 32, n_classes: int = 100, n_images: int = 20,
                     cache_dir: Path | None = None) -> list[Source]:
    """The embedded benchmark's domains as sources (built or read from the cache)."""
    domains = build_embedded(seed, resolution, n_classes, n_images, cache_dir)
    return [EmbeddedSource(name, domains[name], domain.split) for name, domain in EMBEDDED_DOMAINS.items()]
