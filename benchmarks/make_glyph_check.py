"""A real-image out-of-distribution few-shot check: letters of four writing systems rendered from fonts.

    python benchmarks/make_glyph_check.py /tmp/glyph_check        # a few seconds on one CPU core
    python evaluate.py RUN_DIR --data folder:/tmp/glyph_check@ood   # meta-test a run on it

It writes ROOT/<writing system>/<character>/<NNN>.png, the layout `readers.folder_sources` reads as one
source per domain; with @ood every class is a test class. A class is one letter (Armenian lowercase,
Georgian Mkhedruli, Hebrew, Lao consonants); its 20 images (5-shot + 15 queries) are that letter
typeset by different DejaVu font files (sans, serif, mono; book, bold, oblique, so weight and slant
vary), each with a mild random rotation (+-10 deg), scale (0.8-1.05) and shift (+-10 % of the side),
dark ink on white, 64 x 64 grey PNGs. `--polarity light-on-dark` writes the same images inverted
(255 - each pixel, the polarity of every embedded benchmark domain), so an effect can be checked in
both polarities on identical episodes.

The glyphs are real font renderings, drawn by type designers, not procedural strokes: they are
disjoint from the project's procedural benchmark (data.py) and from the procedural corpus the
stand-in backbone is pretrained on (standin.py). The fonts are the DejaVu TrueType files that ship
inside matplotlib, so the check builds offline wherever the project's test extra is installed. A
letter is used only if at least MIN_FONTS of those files have a glyph for it (cmap entry and
non-empty ink), and each image is drawn from one of the files that do.

Letters keep their size and height above the baseline within a writing system (one font size per
system, like a line of text), so a letter that differs from another only by reaching below the line
stays distinguishable. Same seed, same fonts and same Pillow/FreeType -> byte-identical PNGs; the
versions and font hashes are written to ROOT/glyph_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont, ImageOps, features

try:
    import matplotlib
    from matplotlib.ft2font import FT2Font
except ImportError:  # the fonts ship with matplotlib; without it there is nothing to render
    matplotlib = None

MIN_FONTS = 3  # a class needs this many font files with its glyph, or its images are near copies
MIN_ELIGIBLE = 20  # a writing system with fewer usable letters is left out (coverage differs by version)
SUPERSAMPLE = 4  # draw, rotate and shift at 4x the side, then average down: smooth edges at any size
FILL = 0.72  # the tallest/widest letter of a system spans this much of the side before the nuisances
MEASURE_EM = 100  # font size (px) at which letter extents are measured to set each system's font size

# Two writing systems are reserved for an independent check and never drawn here (tests pin their blocks).
DOMAINS: dict[str, list[int]] = {
    # The 38 lowercase letters: several capitals repeat a lowercase shape at another size (Ս/ս, Օ/օ).
    "armenian": list(range(0x0561, 0x0587)),
    # Mkhedruli, the everyday Georgian script (33 modern and 10 archaic letters).
    "georgian": list(range(0x10D0, 0x10FB)),
    # The 22 letters and 5 final forms.
    "hebrew": list(range(0x05D0, 0x05EB)),
    # The consonants; the block has unassigned holes, which the letter-category filter drops.
    "lao": list(range(0x0E81, 0x0EAF)),
}


class BuildError(ValueError):
    """Bad input to `build`: the message names the problem and what is valid."""


def font_files() -> list[Path]:
    """The DejaVu TrueType files shipped inside matplotlib, sorted by name."""
    if matplotlib is None:
        raise BuildError("matplotlib is not installed; it ships the DejaVu fonts this check renders "
                         "(pip install matplotlib, or the project's test extra)")
    files = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
    if not files:
        raise BuildError(f"no DejaVu*.ttf under {Path(matplotlib.get_data_path()) / 'fonts' / 'ttf'}; "
                         f"reinstall matplotlib")
    return files


_fonts: dict[tuple[Path, int], ImageFont.FreeTypeFont] = {}


def _font(path: Path, em: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point -> its default (isolated) glyph, whether or not libraqm is present
    if (path, em) not in _fonts:
        _fonts[path, em] = ImageFont.truetype(str(path), em, layout_engine=ImageFont.Layout.BASIC)
    return _fonts[path, em]


def _draw(path: Path, codepoint: int, em: int) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """The glyph as white ink on black, its baseline-left anchor at (em, 2 em) of a 3 em square
    (room for any letter), and its ink box relative to that anchor (None if it draws nothing)."""
    canvas = Image.new("L", (3 * em, 3 * em), 0)
    ImageDraw.Draw(canvas).text((em, 2 * em), chr(codepoint), font=_font(path, em), fill=255, anchor="ls")
    box = canvas.getbbox()
    return canvas, None if box is None else (box[0] - em, box[1] - 2 * em, box[2] - em, box[3] - 2 * em)


def coverage(fonts: list[Path]) -> dict[str, dict[int, list[Path]]]:
    """Per writing system, per letter: the font files that really have its glyph (a cmap entry, so
    not the .notdef box, and ink when drawn)."""
    cmaps = {path: FT2Font(str(path)) for path in fonts}
    covered: dict[str, dict[int, list[Path]]] = {}
    for domain, codepoints in DOMAINS.items():
        covered[domain] = {}
        for codepoint in codepoints:
            if unicodedata.category(chr(codepoint)) not in ("Lu", "Ll", "Lo"):
                continue  # unassigned, marks, modifiers: not a letter of its own
            covered[domain][codepoint] = [path for path in fonts if cmaps[path].get_char_index(codepoint)
                                          and _draw(path, codepoint, MEASURE_EM)[1] is not None]
    return covered


def choose(eligible: list[int], max_classes: int) -> list[int]:
    """At most `max_classes` letters, evenly spaced in code-point order: independent of the seed, so
    seeds only change the renderings, and spread over the alphabet rather than its first letters."""
    if len(eligible) <= max_classes:
        return list(eligible)
    return [eligible[i] for i in np.linspace(0, len(eligible) - 1, max_classes).round().astype(int)]


def class_name(codepoint: int) -> str:
    """Folder name of a letter, e.g. U0561_armenian-small-letter-ayb (code point first: sortable)."""
    return f"U{codepoint:04X}_" + unicodedata.name(chr(codepoint)).lower().replace(" ", "-")


def _layout(boxes: list[tuple[int, int, int, int]], side: int) -> tuple[int, float]:
    """One font size and baseline height per writing system, from the ink boxes of all its eligible
    letters in all their fonts at MEASURE_EM: the widest and the tallest extent fit FILL of the side,
    and that extent is centred vertically. Letters keep their relative size and height on the line."""
    width = max(right - left for left, _, right, _ in boxes)
    top, bottom = min(box[1] for box in boxes), max(box[3] for box in boxes)
    em_scale = FILL * side / max(width, bottom - top)
    return max(1, round(MEASURE_EM * em_scale)), side / 2 - (top + bottom) / 2 * em_scale


POLARITIES = ("dark-on-light", "light-on-dark")


def render(glyph: Image.Image, box: tuple[int, int, int, int], em: int, baseline: float, side: int,
           rng: np.random.Generator, polarity: str = "dark-on-light") -> Image.Image:
    """One image of a glyph drawn by `_draw`: its ink centred horizontally and its baseline at
    `baseline` of a supersampled square, then rotated, scaled and shifted about the centre, averaged
    down to `side` and, for dark-on-light, inverted to dark ink on white."""
    big = side * SUPERSAMPLE
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.8, 1.05)
    shift_x, shift_y = rng.uniform(-0.1, 0.1, 2) * big
    # Output pixel p comes from glyph pixel q = R(-angle) (p - centre - shift) / scale + centre + offset,
    # offset moving the ink centre and the baseline of the glyph canvas onto the canonical spot.
    centre = big / 2
    offset_x = em + (box[0] + box[2]) / 2 - centre
    offset_y = 2 * em - baseline
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    move_x, move_y = -(centre + shift_x), -(centre + shift_y)
    coefficients = (cos, sin, cos * move_x + sin * move_y + centre + offset_x,
                    -sin, cos, -sin * move_x + cos * move_y + centre + offset_y)
    image = glyph.transform((big, big), Image.AFFINE, tuple(float(c) for c in coefficients),
                            resample=Image.BICUBIC)
    image = image.resize((side, side), Image.BOX)  # white ink on black, as drawn
    return ImageOps.invert(image) if polarity == "dark-on-light" else image


def _check(out_dir: Path, images: int, size: int, seed: int, max_classes: int, polarity: str) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"OUT_DIR {out_dir} is a file; give a new or empty directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise BuildError(f"OUT_DIR {out_dir} exists and is not empty; give a new or empty directory "
                         f"(the tree is written whole, never merged)")
    if images < 2:
        raise BuildError(f"--images {images} is too few; use at least 2 (20 for 5-shot 15-query episodes)")
    if size < 8:
        raise BuildError(f"--size {size} is too small; use at least 8 pixels")
    if seed < 0:
        raise BuildError(f"--seed {seed} is negative; use an integer >= 0")
    if polarity not in POLARITIES:
        raise BuildError(f"--polarity {polarity} is not valid; use {' or '.join(POLARITIES)}")
    if max_classes < 5:
        raise BuildError(f"--max-classes {max_classes} is too few; use at least 5 (episodes are 5-way)")


def build(out_dir: Path, images: int = 20, size: int = 64, seed: int = 0, max_classes: int = 40,
          polarity: str = "dark-on-light") -> dict:
    """Write the check to `out_dir` (new or empty) and return its manifest (also written to
    OUT_DIR/glyph_check.json). Raises BuildError on bad input, before writing anything.

    The tree is built in OUT_DIR.tmp-PID next to it and renamed into place at the end, so an
    interrupted build never leaves a partial OUT_DIR (a killed one leaves only the .tmp-PID folder)."""
    out_dir = Path(os.path.abspath(out_dir))
    _check(out_dir, images, size, seed, max_classes, polarity)
    fonts = font_files()
    covered = coverage(fonts)
    manifest: dict = {
        "seed": seed, "images": images, "size": size, "max_classes": max_classes, "min_fonts": MIN_FONTS,
        "polarity": polarity,
        "pillow": PIL.__version__, "freetype": features.version("freetype2"),
        "matplotlib": matplotlib.__version__,
        "fonts": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in fonts},
        "domains": {}, "skipped": {},
    }
    temporary = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    temporary.mkdir(parents=True)
    try:
        for domain, letters in covered.items():
            eligible = [cp for cp, paths in letters.items() if len(paths) >= MIN_FONTS]
            if len(eligible) < MIN_ELIGIBLE:
                manifest["skipped"][domain] = f"{len(eligible)} letters in >= {MIN_FONTS} fonts"
                continue
            boxes = [_draw(path, cp, MEASURE_EM)[1] for cp in eligible for path in letters[cp]]
            em, baseline = _layout(boxes, size * SUPERSAMPLE)
            manifest["domains"][domain] = {"eligible": len(eligible), "font_size": em, "classes": {}}
            for codepoint in choose(eligible, max_classes):
                paths = letters[codepoint]
                # Seeded per letter: a class renders the same whatever --max-classes picks besides it.
                rng = np.random.default_rng([seed, codepoint])
                order = rng.permutation(len(paths))  # every covering font in turn, in a seeded order
                glyphs = {path: _draw(path, codepoint, em) for path in paths}
                folder = temporary / domain / class_name(codepoint)
                folder.mkdir(parents=True)
                used = []
                for index in range(images):
                    path = paths[order[index % len(paths)]]
                    render(*glyphs[path], em, baseline, size, rng, polarity).save(folder / f"{index:03d}.png")
                    used.append(path.name)
                manifest["domains"][domain]["classes"][class_name(codepoint)] = {
                    "codepoint": f"U+{codepoint:04X}", "character": chr(codepoint),
                    "covering_fonts": [path.name for path in paths], "image_fonts": used,
                }
        if not manifest["domains"]:
            raise BuildError(f"no writing system has {MIN_ELIGIBLE} letters in {MIN_FONTS} of the fonts "
                             f"under {fonts[0].parent}; reinstall matplotlib")
        (temporary / "glyph_check.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory on every OS
        temporary.rename(out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return manifest


def coverage_table(manifest: dict) -> str:
    """Font files (rows) x writing systems (columns): how many of the chosen letters each file covers."""
    domains = list(manifest["domains"])
    rows = [f"{'font file':32}" + "".join(f"{d:>10}" for d in domains)]
    for name in manifest["fonts"]:
        counts = [sum(name in c["covering_fonts"] for c in manifest["domains"][d]["classes"].values())
                  for d in domains]
        rows.append(f"{name:32}" + "".join(f"{n:>10}" for n in counts))
    chosen = [list(manifest["domains"][d]["classes"].values()) for d in domains]
    rows.append(f"{'classes (eligible)':32}" + "".join(
        f"{len(c)} ({manifest['domains'][d]['eligible']})".rjust(10) for d, c in zip(domains, chosen)))
    spans = [[len(letter["covering_fonts"]) for letter in c] for c in chosen]
    rows.append(f"{'fonts per letter':32}" + "".join(f"{min(n)}-{max(n)}".rjust(10) for n in spans))
    return "\n".join(rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as for the checks in `build`
        self.exit(2, f"error: {message}; see --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new or empty directory to write")
    parser.add_argument("--images", type=int, default=20, help="images per class (default 20 = 5 + 15)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the renderings (default 0)")
    parser.add_argument("--max-classes", type=int, default=40, help="letters per writing system (default 40)")
    parser.add_argument("--polarity", default="dark-on-light", metavar="|".join(POLARITIES),
                        help="dark ink on white (default) or the same images inverted")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build(args.out_dir, args.images, args.size, args.seed, args.max_classes, args.polarity)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    domains = manifest["domains"]
    n_classes = sum(len(d["classes"]) for d in domains.values())
    fonts_used = {f for d in domains.values() for c in d["classes"].values() for f in c["image_fonts"]}
    print(coverage_table(manifest))
    print(f"\nwrote {Path(os.path.abspath(args.out_dir))}: {len(domains)} writing systems ("
          + ", ".join(f"{name} {len(d['classes'])}" for name, d in domains.items())
          + f" classes), {n_classes} x {args.images} = {n_classes * args.images} images of "
          f"{args.size} px, {len(fonts_used)} font files, {seconds:.1f} s")
    for name, why in manifest["skipped"].items():
        print(f"note: left out {name}: {why}")
    if args.images < 20:
        print("note: 5-way 5-shot 15-query episodes need 20 images per class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
