"""The tiny stand-in for DINO: its pretraining corpus, and how the shipped weights were made.

Plumbing: run once, to make weights/tiny.pt; training reads the committed weights.

DINO ViT-S/16 never saw Omniglot, Quickdraw or any Meta-Dataset test source: it was pretrained,
once, on other images. The stand-in keeps that property on the embedded benchmark. It is pretrained
once, on seven procedural families that are disjoint in *structure* (and so in classes) from the
eight ID and far-OOD benchmark domains (the near-OOD `scripts`, curved pen strokes, is close to the
`beziers` family, as measured in docs/benchmark.md), and the weights are committed (`weights/tiny.pt`, SHA-256 recorded in
`backbone.SHIPPED_WEIGHTS`), so the default run loads them and its numbers do not depend on the thread
count of the machine that pretrained them.

    python standin.py                    # 6 minutes on 2 CPU cores; writes weights/tiny.pt
    python standin.py --picture docs/standin_corpus.png     # what the corpus looks like

Family (a class is a ...)            what is disjoint from the benchmark (docs/benchmark.md)
  polygons   straight-edged k-gon, filled or outlined   shapes are smooth radius profiles
  beziers    one or two smooth open Bézier strokes      glyphs are straight strokes, curves closed
  automata   an elementary cellular-automaton rule      tilings are periodic motifs
  noise      a band-pass spectrum of random noise       gratings are two pure sinusoids
  blobs      a signed mixture of Gaussian bumps         constellations are sharp discs
  icons      a 3x3 grid of primitives (disc, square, ...)  no benchmark domain composes primitives
  fractals   an iterated function system (3 affine maps)  no benchmark domain is self-similar

Polarity (light ink on dark, dark ink on light) and colour are random per image, so that features
learned here are not tied to the benchmark's light-on-dark rendering, and real images of either
polarity can be read. Supervised classification over every class of every family (AdamW, cosine,
label smoothing: backbone.pretrain_supervised) is the pretext task; docs/benchmark.md argues the
choice and measures the transfer.
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import backbone as backbones
from benchmark import in_chunks, object_coords, random_poses, segment_distance, soft_edge
from data import normalise

WEIGHTS = backbones.SHIPPED_WEIGHTS["tiny"][0]
CORPUS_SEED = 1  # the benchmark uses seed 0; the corpus families are disjoint by construction anyway
RECIPE = dict(classes_per_family=300, images_per_class=16, resolution=32, epochs=30, batch_size=128,
              lr=2e-3, weight_decay=0.05, seed=0)


# --- § 1 Seven procedural families (coverage maps in [0, 1], shape (n, res, res)) ------------------


def _polygons(rng, n_classes, n_images, res):
    """A class is a k-gon (3-7 vertices at fixed angles and radii), filled or outlined."""
    k = rng.integers(3, 8, n_classes)
    angles = np.sort(rng.uniform(0, 2 * np.pi, (n_classes, 7)), axis=1)
    radii = rng.uniform(0.45, 0.8, (n_classes, 7))
    outline = rng.uniform(size=n_classes) < 0.5
    n = n_classes * n_images
    angles = np.repeat(angles, n_images, 0) + rng.normal(0, 0.05, (n, 7))
    radii = np.repeat(radii, n_images, 0) * rng.uniform(0.92, 1.08, (n, 7))
    k, outline = np.repeat(k, n_images), np.repeat(outline, n_images)
    # vertices beyond k repeat the first one: a degenerate edge of zero length draws nothing new
    used = np.arange(7)[None] < k[:, None]
    vx, vy = radii * np.cos(angles), radii * np.sin(angles)
    vx, vy = np.where(used, vx, vx[:, :1]), np.where(used, vy, vy[:, :1])
    vertices = np.stack([vx, vy], -1)

    def render(pose, vertices, outline):
        x, y = object_coords(pose, res)
        start, end = vertices, np.roll(vertices, -1, axis=1)
        edge = segment_distance(x, y, start, end).min(1)
        # inside test: winding by the sign of crossings of a ray to +x
        ax, ay = start[..., 0, None, None], start[..., 1, None, None]
        bx, by = end[..., 0, None, None], end[..., 1, None, None]
        crosses = ((ay > y[:, None]) != (by > y[:, None])) & (
            x[:, None] < (bx - ax) * (y[:, None] - ay) / (by - ay + 1e-9) + ax)
        inside = crosses.sum(1) % 2 == 1
        filled = np.maximum(inside.astype(np.float32), soft_edge(0.02 - edge, res))
        return np.where(outline[:, None, None], soft_edge(0.06 - edge, res), filled)

    return in_chunks(render, random_poses(rng, n, np.pi, (0.8, 1.1), 0.15), vertices, outline)


def _beziers(rng, n_classes, n_images, res):
    """A class is one or two cubic Bézier strokes (four control points each), drawn as polylines."""
    control = rng.uniform(-0.75, 0.75, (n_classes, 2, 4, 2))
    second = rng.uniform(size=n_classes) < 0.5
    n = n_classes * n_images
    control = np.repeat(control, n_images, 0) + rng.normal(0, 0.05, (n, 2, 4, 2))
    second = np.repeat(second, n_images)
    t = np.linspace(0, 1, 13)[:, None]
    basis = np.concatenate([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], 1)  # 13 x 4
    points = np.einsum("tk,nskd->nstd", basis, control)  # (n, 2 strokes, 13 points, 2)
    width = rng.uniform(0.05, 0.09, (n, 1, 1, 1))

    def render(pose, points, second, width):
        x, y = object_coords(pose, res)
        start, end = points[:, :, :-1].reshape(len(x), -1, 2), points[:, :, 1:].reshape(len(x), -1, 2)
        keep = np.ones(start.shape[:2], bool)
        keep[:, 12:] = second[:, None]  # segments of the second stroke
        distance = np.where(keep[..., None, None], segment_distance(x, y, start, end), 9.0)
        return soft_edge(width[:, 0] - distance.min(1), res)

    return in_chunks(render, random_poses(rng, n, 0.5, (0.85, 1.1), 0.12), points, second, width)


def _automata(rng, n_classes, n_images, res):
    """A class is an elementary cellular-automaton rule and a cell size; an instance is a new random
    first row (and a shift), so the class is the rule's texture, not one picture."""
    rules = rng.choice(np.arange(1, 255), n_classes, replace=n_classes > 254)
    cell = rng.choice([2, 3, 4], n_classes)
    n = n_classes * n_images
    rules, cell = np.repeat(rules, n_images), np.repeat(cell, n_images)
    table = (rules[:, None] >> np.arange(8)[None]) & 1  # (n, 8): new state for neighbourhood value
    width = res // 2 + 2
    rows = [rng.uniform(size=(n, width)) < 0.5]
    for _ in range(res // 2 - 1):
        left, right = np.roll(rows[-1], 1, 1), np.roll(rows[-1], -1, 1)
        neighbourhood = 4 * left + 2 * rows[-1] + right
        rows.append(np.take_along_axis(table, neighbourhood.astype(np.int64), 1).astype(bool))
    grid = np.stack(rows, 1).astype(np.float32)  # (n, res/2 rows, width)
    out = np.empty((n, res, res), np.float32)
    for size in (2, 3, 4):  # upsample each cell size in one block
        pick = cell == size
        block = np.repeat(np.repeat(grid[pick], size, 1), size, 2)
        shift = rng.integers(0, size, 2)
        out[pick] = np.pad(block, ((0, 0), (0, res), (0, res)), mode="wrap")[:, shift[0]:shift[0] + res,
                                                                             shift[1]:shift[1] + res]
    return out


def _noise(rng, n_classes, n_images, res):
    """A class is a band-pass filter in the Fourier plane (a band of frequencies and orientations);
    an instance filters fresh white noise with it: stationary textures, as in DTD."""
    f0 = rng.uniform(1.5, 8.0, n_classes)
    bandwidth = rng.uniform(0.5, 2.5, n_classes)
    theta = rng.uniform(0, np.pi, n_classes)
    spread = rng.uniform(0.2, 1.6, n_classes)  # orientation selectivity; large = isotropic
    n = n_classes * n_images
    fy, fx = np.meshgrid(np.fft.fftfreq(res) * res, np.fft.fftfreq(res) * res, indexing="ij")
    radius, angle = np.hypot(fx, fy), np.arctan2(fy, fx)
    out = np.empty((n, res, res), np.float32)
    for c in range(n_classes):
        orientation = np.cos(angle - theta[c]) ** 2
        gain = np.exp(-((radius - f0[c]) ** 2) / (2 * bandwidth[c] ** 2)) * np.exp((orientation - 1) / spread[c] ** 2)
        noise = np.fft.fft2(rng.normal(size=(n_images, res, res)))
        field = np.real(np.fft.ifft2(noise * gain))
        field /= field.std(axis=(1, 2), keepdims=True) + 1e-8
        out[c * n_images:(c + 1) * n_images] = 1 / (1 + np.exp(-2.0 * field))
    return out


def _blobs(rng, n_classes, n_images, res):
    """A class is 3-5 Gaussian bumps with signs (positions, widths, amplitudes); a smooth field."""
    centres = rng.uniform(-0.7, 0.7, (n_classes, 5, 2))
    sigma = rng.uniform(0.12, 0.35, (n_classes, 5))
    amplitude = rng.choice([-1.0, 1.0], (n_classes, 5)) * rng.uniform(0.5, 1.0, (n_classes, 5))
    amplitude[:, 3:] *= rng.uniform(size=(n_classes, 2)) < 0.6
    n = n_classes * n_images
    centres = np.repeat(centres, n_images, 0) + rng.normal(0, 0.05, (n, 5, 2))
    sigma = np.repeat(sigma, n_images, 0) * rng.uniform(0.9, 1.1, (n, 5))
    amplitude = np.repeat(amplitude, n_images, 0)

    def render(pose, centres, sigma, amplitude):
        x, y = object_coords(pose, res)
        d2 = (x[:, None] - centres[..., 0, None, None]) ** 2 + (y[:, None] - centres[..., 1, None, None]) ** 2
        field = (amplitude[..., None, None] * np.exp(-d2 / (2 * sigma[..., None, None] ** 2))).sum(1)
        return 1 / (1 + np.exp(-4.0 * field))

    return in_chunks(render, random_poses(rng, n, np.pi, (0.85, 1.1), 0.1), centres, sigma, amplitude)


def _icons(rng, n_classes, n_images, res):
    """A class is a 3x3 layout of primitives (none, disc, square, triangle, cross, ring): pictograms."""
    layout = rng.integers(0, 6, (n_classes, 9))
    layout[:, 4] = rng.integers(1, 6, n_classes)  # never empty in the centre
    n = n_classes * n_images
    layout = np.repeat(layout, n_images, 0)
    centres = np.stack(np.meshgrid([-0.55, 0, 0.55], [-0.55, 0, 0.55]), -1).reshape(9, 2)
    centres = centres[None] + rng.normal(0, 0.03, (n, 9, 2))

    def render(pose, layout, centres):
        x, y = object_coords(pose, res)
        u, v = x[:, None] - centres[..., 0, None, None], y[:, None] - centres[..., 1, None, None]
        r, size = np.hypot(u, v), 0.2
        shapes = np.stack([
            np.zeros_like(r),
            soft_edge(size - r, res),  # disc
            soft_edge(size - np.maximum(abs(u), abs(v)), res),  # square
            soft_edge(np.minimum(size - v, np.minimum(v + size + 1.7 * u, v + size - 1.7 * u)) / 2, res),  # triangle
            soft_edge(0.05 - np.minimum(abs(u), abs(v)), res) * (np.maximum(abs(u), abs(v)) < size),  # cross
            soft_edge(0.05 - abs(r - 0.15), res),  # ring
        ])  # (6, n, 9, h, w)
        picked = np.take_along_axis(shapes, layout[None, :, :, None, None], 0)[0]
        return picked.max(1)

    return in_chunks(render, random_poses(rng, n, 0.3, (0.85, 1.05), 0.1), layout, centres, size=128)


def _fractals(rng, n_classes, n_images, res):
    """A class is an iterated function system of three contractive affine maps; the chaos game
    splats 3000 points of its attractor on a 4x grid, average-pooled back (anti-aliasing)."""
    linear = rng.uniform(-0.6, 0.6, (n_classes, 3, 2, 2))
    linear *= 0.65 / np.maximum(np.abs(np.linalg.eigvals(linear)).max(-1), 0.65)[..., None, None]  # contract
    offset = rng.uniform(-0.5, 0.5, (n_classes, 3, 2))
    n = n_classes * n_images
    linear = np.repeat(linear, n_images, 0) * rng.uniform(0.95, 1.05, (n, 3, 1, 1))
    offset = np.repeat(offset, n_images, 0) + rng.normal(0, 0.02, (n, 3, 2))
    point, points = np.zeros((n, 2)), []
    for step in range(3020):
        choice = rng.integers(0, 3, n)
        point = np.einsum("nij,nj->ni", linear[np.arange(n), choice], point) + offset[np.arange(n), choice]
        if step >= 20:  # burn-in: the first points are not yet on the attractor
            points.append(point)
    points = np.stack(points, 1)  # (n, 3000, 2)
    spread = points.std(1).max(-1)[:, None, None]  # fit the attractor's larger axis to the image
    points = (points - points.mean(1, keepdims=True)) / (2.5 * spread + 1e-6)
    angle, scale = rng.uniform(-np.pi, np.pi, n)[:, None], rng.uniform(0.85, 1.1, n)[:, None]
    px = scale * (np.cos(angle) * points[..., 0] - np.sin(angle) * points[..., 1])
    py = scale * (np.sin(angle) * points[..., 0] + np.cos(angle) * points[..., 1])
    fine = 4 * res
    col = np.clip(((px + 1) / 2 * fine).astype(np.int64), 0, fine - 1)
    row = np.clip(((py + 1) / 2 * fine).astype(np.int64), 0, fine - 1)
    canvas = np.zeros((n, fine * fine), np.float32)
    np.put_along_axis(canvas, row * fine + col, 1.0, axis=1)
    canvas = F.max_pool2d(torch.from_numpy(canvas).view(n, 1, fine, fine), 3, stride=1, padding=1)
    return F.avg_pool2d(canvas, 4)[:, 0].numpy()


FAMILIES: dict[str, Callable] = {"polygons": _polygons, "beziers": _beziers, "automata": _automata,
                                 "noise": _noise, "blobs": _blobs, "icons": _icons, "fractals": _fractals}


def _colour(rng: np.random.Generator, coverage: np.ndarray) -> np.ndarray:
    """Coverage -> RGB in [0, 1]: random ink and background of random polarity, a third of them grey,
    plus pixel noise. (n, res, res) -> (n, 3, res, res)."""
    n = len(coverage)
    light, dark = rng.uniform(0.6, 1.0, (n, 3)), rng.uniform(0.0, 0.4, (n, 3))
    grey = rng.uniform(size=n) < 1 / 3
    light[grey], dark[grey] = light[grey, :1], dark[grey, :1]
    flip = rng.uniform(size=n) < 0.5  # dark ink on a light background for half the images
    ink, background = np.where(flip[:, None], dark, light), np.where(flip[:, None], light, dark)
    images = coverage[:, None] * ink[:, :, None, None] + (1 - coverage[:, None]) * background[:, :, None, None]
    return np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1).astype(np.float32)


def build_corpus(classes_per_family: int, images_per_class: int, resolution: int,
                 seed: int = CORPUS_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): uint8 (n, 3, res, res) and int64 (n,), classes numbered across families."""
    images, labels = [], []
    for index, (name, family) in enumerate(FAMILIES.items()):
        rng = np.random.default_rng([seed, index])
        coverage = family(rng, classes_per_family, images_per_class, resolution).astype(np.float32)
        images.append(torch.from_numpy((_colour(rng, coverage) * 255 + 0.5).astype(np.uint8)))
        labels.append(torch.arange(classes_per_family).repeat_interleave(images_per_class) + index * classes_per_family)
    return torch.cat(images), torch.cat(labels)


# --- § 2 Pretraining and the shipped file ---------------------------------------------------------


def pretrain(recipe: dict = RECIPE, out: Path = WEIGHTS, log: Callable[[str], None] = print) -> dict:
    """Build the corpus, pretrain the tiny ViT on it, write `out`; returns the pretraining history."""
    started = time.perf_counter()
    images, labels = build_corpus(recipe["classes_per_family"], recipe["images_per_class"], recipe["resolution"])
    log(f"corpus: {len(labels)} images, {int(labels.max()) + 1} classes, {time.perf_counter() - started:.0f} s")
    torch.manual_seed(recipe["seed"])
    model = backbones.build_backbone("tiny")
    inputs = normalise(images.float().div_(255))

    def progress(step: int, total: int, stats: dict) -> None:
        if step % 200 == 0 or step == total:
            log(f"step {step}/{total} epoch {stats['epoch']} loss {stats['loss']:.3f} "
                f"{time.perf_counter() - started:.0f} s")

    history = backbones.pretrain_supervised(
        model, inputs, labels, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        weight_decay=recipe["weight_decay"], seed=recipe["seed"], progress=progress)
    meta = {"recipe": recipe, "families": list(FAMILIES), "corpus_seed": CORPUS_SEED, "history": history,
            "torch": str(torch.__version__), "seconds": round(time.perf_counter() - started),
            "command": "python standin.py"}
    backbones.save_backbone(model.cpu(), out, meta)
    log(f"wrote {out} (sha256 {backbones.file_sha256(out)}: record it in backbone.SHIPPED_WEIGHTS), "
        f"final train accuracy {history[-1]['accuracy']:.1%}")
    return meta


def picture(path: Path, classes: int = 6, images: int = 4) -> None:
    """A PNG of the corpus: one row per family, `classes` classes x `images` instances each."""
    from PIL import Image

    corpus, _ = build_corpus(classes, images, RECIPE["resolution"])
    rows = corpus.view(len(FAMILIES), classes * images, 3, RECIPE["resolution"], RECIPE["resolution"])
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--picture"]:  # python standin.py --picture docs/standin_corpus.png
        picture(Path(sys.argv[2]))
    else:
        pretrain(json.loads(sys.argv[1]) if len(sys.argv) > 1 else RECIPE)
