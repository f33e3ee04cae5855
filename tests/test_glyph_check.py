"""benchmarks/make_glyph_check.py: layout, determinism, letters only from allowed scripts, and the
project's folder reader accepting the tree. Tiny builds (5 letters x 3 images of 16 px), about 1 s."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

import readers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "make_glyph_check.py"
_spec = importlib.util.spec_from_file_location("make_glyph_check", SCRIPT)
glyph_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glyph_check)

IMAGES, CLASSES, SIZE = 3, 5, 16
# Reserved for an independent check: no class of this one may fall in these blocks.
FORBIDDEN = [(0x0370, 0x03FF), (0x1F00, 0x1FFF), (0x0400, 0x052F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F),
             (0x1C80, 0x1C8F)]


def tiny(root: Path, seed: int = 0, max_classes: int = CLASSES) -> Path:
    glyph_check.build(root, images=IMAGES, size=SIZE, seed=seed, max_classes=max_classes)
    return root


def pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.png"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return tiny(tmp_path_factory.mktemp("glyphs") / "check")


def test_layout_has_the_asked_counts(built):
    domains = sorted(d for d in built.iterdir() if d.is_dir())
    assert len(domains) >= 3
    for domain in domains:
        classes = sorted(c for c in domain.iterdir())
        assert len(classes) == CLASSES and all(c.is_dir() for c in classes)
        for folder in classes:
            files = sorted(folder.iterdir())
            assert [f.name for f in files] == [f"{i:03d}.png" for i in range(IMAGES)]
            with Image.open(files[0]) as image:
                assert image.size == (SIZE, SIZE)
    assert not list(built.parent.glob("check.tmp-*"))  # the build folder was renamed into place


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    assert pngs(tiny(tmp_path / "again")) == pngs(built)
    other = pngs(tiny(tmp_path / "other", seed=1))
    assert other.keys() == pngs(built).keys() and other != pngs(built)


def test_the_other_polarity_is_the_same_images_inverted_pixel_for_pixel(built, tmp_path):
    inverted = tmp_path / "inverted"
    glyph_check.build(inverted, images=IMAGES, size=SIZE, max_classes=CLASSES, polarity="light-on-dark")
    names = sorted(p.relative_to(built) for p in built.glob("*/*/*.png"))
    assert names == sorted(p.relative_to(inverted) for p in inverted.glob("*/*/*.png"))
    for name in names:
        dark_ink, light_ink = (np.asarray(Image.open(root / name), dtype=np.int16) for root in (built, inverted))
        assert (dark_ink + light_ink == 255).all()
    assert glyph_check.json.loads((inverted / "glyph_check.json").read_text())["polarity"] == "light-on-dark"
    with pytest.raises(glyph_check.BuildError, match="--polarity"):
        glyph_check.build(tmp_path / "bad", polarity="grey")


def test_a_letter_renders_the_same_whatever_else_is_chosen(built, tmp_path):
    more = pngs(tiny(tmp_path / "more", max_classes=CLASSES + 3))
    shared = {name: png for name, png in pngs(built).items() if name in more}
    assert len(shared) >= IMAGES and all(more[name] == png for name, png in shared.items())


def test_no_letter_from_the_reserved_scripts(built):
    codepoints = [int(c.name[1:].split("_")[0], 16) for c in built.glob("*/*") if c.is_dir()]
    assert codepoints
    assert not [hex(cp) for cp in codepoints if any(lo <= cp <= hi for lo, hi in FORBIDDEN)]
    for domain in glyph_check.DOMAINS.values():  # nor any letter the script could ever choose
        assert not [hex(cp) for cp in domain if any(lo <= cp <= hi for lo, hi in FORBIDDEN)]


def test_different_letters_look_different(built):
    for domain in (d for d in built.iterdir() if d.is_dir()):
        firsts = [np.asarray(Image.open(c / "000.png"), dtype=np.int16) for c in sorted(domain.iterdir())]
        for i in range(len(firsts)):
            for j in range(i + 1, len(firsts)):
                assert np.abs(firsts[i] - firsts[j]).mean() > 1, (domain.name, i, j)
        assert all(f.min() < 100 and np.median(f) > 200 for f in firsts)  # dark ink on a light ground


def test_the_folder_reader_takes_it_as_ood_sources(built):
    sources = readers.parse_data_spec(f"folder:{built}@ood", 32)
    domains = sorted(d.name for d in built.iterdir() if d.is_dir())
    assert sorted(s.name for s in sources) == domains
    for source in sources:
        assert source.split == "ood"
        assert source.class_sizes("test") == [IMAGES] * CLASSES
        assert source.class_sizes("train") == [] and source.class_sizes("val") == []
        assert source.load("test", 0, range(IMAGES), 32).shape[:2] == (IMAGES, 3)


def test_a_non_empty_out_dir_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--images", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not empty" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("flags, named", [(["--images", "1"], "--images"), (["--size", "4"], "--size")])
def test_bad_numbers_are_refused_before_writing(tmp_path, flags, named):
    with pytest.raises(glyph_check.BuildError, match=named):
        glyph_check.build(tmp_path / "out", **{named[2:]: int(flags[1])})
    assert not list(tmp_path.iterdir())
