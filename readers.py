"""Real image sources behind `--data`, and `parse_data_spec`, the one string that names any source.

§ 1 `ImageListSource`, a domain whose classes are lists of items a reader decodes, and
`folder_sources` (class folders, given train/val/test split folders or CSV files); § 2 `torchvision_source` (torchvision datasets, with
Meta-Dataset's class counts and Omniglot's alphabet hierarchy); § 3 `h5_source` (one Meta-Dataset
source in PMF's h5 layout); § 4 `parse_data_spec` ("embedded", "folder:PATH",
"torchvision:NAME:ROOT", "h5:PATH/SOURCE", comma-joined, each optionally @id / @ood), which also
names the embedded benchmark's domains (benchmark.py). All return `data.Source`s; data.py turns
them into episodes.
"""

import json
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import UInt8
from PIL import Image, UnidentifiedImageError
from torch import Tensor

import benchmark
from data import PARTITIONS, DataError, Hierarchy, Partition, Source, Split, dag_hierarchy, split_counts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
# What PIL raises for a file it cannot decode: a damaged or foreign file, and an image so large that PIL
# refuses it as a possible decompression bomb (DecompressionBombError is no OSError).
UNREADABLE_IMAGE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


# --- § 1 Image lists and image folders ----------------------------------------------------------------



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
                 hierarchies: Mapping[Partition, Hierarchy] | None = None,
                 names: Mapping[Partition, Sequence[str]] | None = None) -> None:
        self.name, self.split, self._read = name, split, read
        self._classes = {p: [list(c) for c in partitions.get(p, [])] for p in PARTITIONS}
        self._hierarchies = dict(hierarchies or {})
        self._names = {p: [str(n) for n in names[p]] for p in PARTITIONS} if names else None

    def class_sizes(self, partition: Partition) -> list[int]:
        return [len(c) for c in self._classes[partition]]

    def class_names(self, partition: Partition) -> list[str]:
        return self._names[partition] if self._names else super().class_names(partition)

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
    except UNREADABLE_IMAGE as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read image {path} ({_why_unreadable(error)}); remove it or replace it with a "
                        f"valid {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file") from None


def _why_unreadable(error: Exception) -> str:
    """The error's name, and for a decompression bomb the limit: "more than PIL's limit of 178956970 pixels"."""
    if isinstance(error, Image.DecompressionBombError):
        return f"DecompressionBombError: more pixels than PIL's limit of {2 * Image.MAX_IMAGE_PIXELS}"
    return type(error).__name__


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_partition(names: Sequence[str], split: Split, seed: int, domain: str,
                     split_file: Path) -> dict[Partition, list[str]]:
    """Class names per partition: from `split_file` ({"train": [...], "val": [...], "test": [...]}) if it
    exists; else a seeded 64/16/20 partition of the sorted names, or all in test for an OOD source
    (as Meta-Dataset's test-only sources)."""
    if split_file.is_file():
        form = '{"train": [...], "val": [...], "test": [...]}'
        try:
            listed = json.loads(split_file.read_text())
            chosen = {p: [str(c) for c in listed.get(p, [])] for p in PARTITIONS}
        except (OSError, ValueError, AttributeError, TypeError) as error:
            raise DataError(f"split file {split_file} is not valid JSON of the form {form} ({error})") from None
        if set(listed) - set(PARTITIONS) or not all(isinstance(listed.get(p, []), list) for p in PARTITIONS):
            raise DataError(f"split file {split_file} has keys {sorted(listed)}; it must be of the form {form}")
        unknown = sorted(set(sum(chosen.values(), [])) - set(names))
        if unknown:
            raise DataError(f"split file {split_file} names classes with no image folder: {unknown[:5]}; "
                            f"valid names are the class folder names")
        listed_twice = sorted({c for c in sum(chosen.values(), []) if sum(p.count(c) for p in chosen.values()) > 1})
        if listed_twice:
            where = [p for p in PARTITIONS if listed_twice[0] in chosen[p]]
            raise DataError(f"split file {split_file} lists class {listed_twice[0]} more than once "
                            f"(in {' and '.join(where)}); each class belongs to one partition")
        return chosen
    if split == "ood":
        return {"train": [], "val": [], "test": list(names)}
    order = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(len(names))
    n_train, n_val, _ = split_counts(len(names))
    shuffled = [names[i] for i in order]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


SPLIT_LAYOUTS = ("ROOT/<class>/<images>, ROOT/<domain>/<class>/<images>, ROOT/{train,val,test}/<class>/<images>, "
                 "ROOT/<domain>/{train,val,test}/<class>/<images> or ROOT/{train,val,test}.csv with ROOT/images/")


def _split_markers(folder: Path) -> tuple[list[str], list[str], bool]:
    """(split folders, split CSVs, whether splits.json exists) directly under `folder`."""
    folders = [s for s in PARTITIONS if (folder / s).is_dir()]
    csvs = [f"{s}.csv" for s in PARTITIONS if (folder / f"{s}.csv").is_file()]
    return folders, csvs, (folder / "splits.json").is_file()


def _layout(folder: Path) -> str:
    """How one domain folder gives its classes: "split folders", "split csv" or "classes" (class folders,
    split by splits.json or a seeded partition). Two ways of giving the split at once is a DataError."""
    folders, csvs, json_file = _split_markers(folder)
    given = [f"split folders {'/'.join(folders)}"] * bool(folders) + [f"split files {', '.join(csvs)}"] * bool(csvs) \
        + ["splits.json"] * json_file
    if len(given) > 1:
        raise DataError(f"{folder} gives its class split in more than one way ({' and '.join(given)}); "
                        f"keep one of them")
    if folders:
        others = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in PARTITIONS)
        if others:
            raise DataError(f"{folder} mixes split folders {'/'.join(folders)} with other folders {others[:5]}; "
                            f"put every class under train/, val/ or test/, or use no split folders")
        return "split folders"
    return "split csv" if csvs else "classes"


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files of every class folder under `folder`; an empty class or an empty
    image file is a DataError (caught here, before a run directory exists, not at its first episode)."""
    files = {d.name: _image_files(d) for d in sorted(folder.iterdir()) if d.is_dir()}
    empty = [name for name, paths in files.items() if not paths]
    if empty:  # a class that silently vanished would change the class split and the episodes
        raise DataError(f"class folder {folder / empty[0]} has no images; add images with suffixes "
                        f"{', '.join(IMAGE_SUFFIXES)} or remove the folder")
    zero = next((path for paths in files.values() for path in paths if path.stat().st_size == 0), None)
    if zero is not None:
        raise DataError(f"image file {zero} is empty; remove it or replace it with a valid image")
    return files


def _given_split(chosen: dict[Partition, list[str]], where: Path) -> None:
    """A class in two given partitions would leak test classes into training: a DataError."""
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(chosen[a]) & set(chosen[b]))
        if shared:
            raise DataError(f"class {shared[0]} is in both the {a} and the {b} split of {where}; "
                            f"each class belongs to one split")


def _split_folder_classes(domain: Path) -> tuple[dict[Partition, list[str]], dict[Partition, list[list[Path]]]]:
    """ROOT/{train,val,test}/<class>/<images>: the given split, never re-split."""
    per_split = {p: _class_files(domain / p) if (domain / p).is_dir() else {} for p in PARTITIONS}
    chosen = {p: sorted(per_split[p]) for p in PARTITIONS}
    _given_split(chosen, domain)
    return chosen, {p: [per_split[p][c] for c in chosen[p]] for p in PARTITIONS}


def _split_csv_classes(domain: Path) -> tuple[dict[Partition, list[str]], dict[Partition, list[list[Path]]]]:
    """miniImageNet's split files ROOT/{train,val,test}.csv, header filename,label; each filename is
    looked up in ROOT/images/ when that folder exists, else next to the CSV files."""
    images = domain / "images" if (domain / "images").is_dir() else domain
    chosen: dict[Partition, list[str]] = {p: [] for p in PARTITIONS}
    partitions: dict[Partition, list[list[Path]]] = {p: [] for p in PARTITIONS}
    for partition in PARTITIONS:
        path = domain / f"{partition}.csv"
        if not path.is_file():
            continue
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read split file {path} ({type(error).__name__})") from None
        if not lines or [c.strip() for c in lines[0].split(",")] != ["filename", "label"]:
            raise DataError(f"split file {path} must start with the header filename,label")
        classes: dict[str, list[Path]] = {}
        for number, line in enumerate(lines[1:], start=2):
            filename, comma, label = line.rpartition(",")
            if not comma or not filename or not label:
                raise DataError(f"line {number} of {path} is not filename,label: {line[:60]!r}")
            classes.setdefault(label.strip(), []).append(images / filename.strip())
        missing = next((p for paths in classes.values() for p in paths if not p.is_file()), None)
        if missing is not None:
            raise DataError(f"{path} names {missing.name}, which is not in {images}; put the images in "
                            f"{domain / 'images'} or next to the CSV files")
        chosen[partition] = sorted(classes)
        partitions[partition] = [sorted(classes[c]) for c in chosen[partition]]
    _given_split(chosen, domain)
    return chosen, partitions


def folder_sources(root: Path, split: Split | None = None, seed: int = 0) -> list[Source]:
    """Image folders in the layouts users have, each domain one source (docs/benchmark.md, "Real data
    layouts"): ROOT/<class>/ (one domain named after ROOT) or ROOT/<domain>/<class>/, whose classes are
    split by an optional splits.json in the domain folder or a seeded 64/16/20 partition; and, with the
    split given and respected, ROOT/{train,val,test}/<class>/, ROOT/<domain>/{train,val,test}/<class>/
    and miniImageNet's ROOT/{train,val,test}.csv. Mixed or ambiguous layouts are a DataError."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected {SPLIT_LAYOUTS}{_mark_hint(root)}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if _layout(root) != "classes" or any(_image_files(d) for d in subdirs):
        domains = [root]
    else:
        domains = [d for d in subdirs if _layout(d) != "classes" or any(
            sub.is_dir() and _image_files(sub) for sub in d.iterdir())]
    if not domains:
        raise DataError(f"no class folders with images under {root}; expected {SPLIT_LAYOUTS}, images with "
                        f"suffixes {', '.join(IMAGE_SUFFIXES)}")
    sources: list[Source] = []
    for domain in domains:
        layout = _layout(domain)
        if layout == "split folders":
            chosen, partitions = _split_folder_classes(domain)
        elif layout == "split csv":
            chosen, partitions = _split_csv_classes(domain)
        else:
            files = _class_files(domain)
            chosen = _class_partition(sorted(files), split or "id", seed, domain.name, domain / "splits.json")
            partitions = {p: [files[name] for name in chosen[p]] for p in PARTITIONS}
        sources.append(ImageListSource(domain.name, split or "id", partitions, _open_image, names=chosen))
    return sources


# --- § 2 torchvision datasets ------------------------------------------------------------------------

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
# Class counts (train, val, test) as in Meta-Dataset v1 [MD dataset_to_records.py]; the classes themselves
# are a seeded partition (the split JSONs are not shipped). Absent: test-only, like MD's extra OOD sources.
MD_CLASS_COUNTS = {"fgvc_aircraft": (70, 15, 15), "dtd": (33, 7, 7), "flowers102": (71, 15, 16)}
# Meta-Dataset's five validation alphabets, carved out of Omniglot's background set [MD omniglot split]
OMNIGLOT_VALID_ALPHABETS = frozenset({
    "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog", "Alphabet_of_the_Magi"})


def torchvision_name(name: str) -> str:
    """The key of TORCHVISION_DATASETS that `name` means: the key or torchvision's class name, in any
    case (fgvc_aircraft, FGVCAircraft, fgvcaircraft)."""
    aliases = {key: key for key in TORCHVISION_DATASETS} | {
        cls.lower(): key for key, (cls, _) in TORCHVISION_DATASETS.items()}
    if name.lower() not in aliases:
        raise DataError(f"unknown torchvision dataset {name!r}; valid: {', '.join(TORCHVISION_DATASETS)} "
                        f"(or torchvision's class names: {', '.join(c for c, _ in TORCHVISION_DATASETS.values())})")
    return aliases[name.lower()]


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _open_torchvision(name: str, root: Path, arguments: dict,
                      download: bool = False) -> tuple[object, list[int], list[str] | None]:
    """(dataset, label of every item, Omniglot's alphabet of every label or None) of one part of a
    torchvision dataset: what lies under ROOT; a download only when asked for (`download`)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name][0])
    try:  # first read what is under ROOT, without the download-integrity hashes
        return _torchvision_part(cls, root, arguments, local=True)
    except Exception as error:
        if not download:
            raise DataError(f"torchvision dataset {name} is not under {root} ({_first_line(error)}); put it "
                            f"there, or add :download=1 to download it: torchvision:{name}:{root}:download=1") from None
    try:
        return _torchvision_part(cls, root, arguments, local=False)
    except Exception as error:
        raise DataError(f"torchvision dataset {name} is not under {root} and could not be downloaded "
                        f"({_first_line(error)}); put it there or allow network access") from None


def _torchvision_part(cls: type, root: Path, arguments: dict,
                      local: bool) -> tuple[object, list[int], list[str] | None]:
    """Every private detail of torchvision this project relies on, and only here. Written against
    torchvision 0.29.1 (the version the tests run with): if a release renames one, this changes.

    `local=True` reads what lies under ROOT without the download MD5s (hashing gigabytes, or lacking
    the archive one extracted, should not stop a local read), through a subclass of `cls` under the
    same name (MNIST and DTD name their folders after the class) whose MD5 tables are None, so that
    torchvision's check_integrity(path, None) only asks that the file exists: CIFAR's `train_list`,
    `test_list` and `meta`, Flowers102's `_file_dict`; Omniglot's `_check_integrity` wants the zip,
    so its replacement accepts the folder the zip extracts to. Labels are read without decoding an
    image from `targets` or the private `_labels`, `_samples`, `_flat_character_images`; Omniglot's
    alphabets from `_characters` ("Alphabet/characterNN").
    """
    if local:
        tables: dict[str, object] = {}
        if hasattr(cls, "train_list"):  # CIFAR10/100: [file, md5] rows and the meta file's md5
            tables |= {"train_list": [[f, None] for f, _ in cls.train_list],
                       "test_list": [[f, None] for f, _ in cls.test_list], "meta": {**cls.meta, "md5": None}}
        if hasattr(cls, "_file_dict"):  # Flowers102: {key: (file, md5)}
            tables["_file_dict"] = {key: (f, None) for key, (f, _) in cls._file_dict.items()}
        if hasattr(cls, "zips_md5"):  # Omniglot: the zip, or the folder it extracts to
            def _check_integrity(self) -> bool:
                folder = os.path.join(self.root, self._get_target_folder())
                return os.path.isdir(folder) or os.path.isfile(folder + ".zip")

            tables["_check_integrity"] = _check_integrity
        cls = type(cls.__name__, (cls,), tables) if tables else cls
    dataset = cls(str(root), download=not local, **arguments)
    if hasattr(dataset, "targets"):
        labels = [int(t) for t in dataset.targets]
    elif hasattr(dataset, "_labels"):
        labels = [int(t) for t in dataset._labels]
    elif hasattr(dataset, "_samples"):
        labels = [int(t) for _, t in dataset._samples]
    elif hasattr(dataset, "_flat_character_images"):
        labels = [int(t) for _, t in dataset._flat_character_images]
    else:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    alphabets = [Path(c).parts[0] for c in dataset._characters] if hasattr(dataset, "_characters") else None
    return dataset, labels, alphabets


def torchvision_source(name: str, root: Path, split: Split | None = None, seed: int = 0,
                       download: bool = False) -> Source:
    """A torchvision dataset as a class-split source; Omniglot keeps MD's alphabet split and hierarchy.
    `name` is a key of TORCHVISION_DATASETS or torchvision's class name; it is downloaded into `root`
    only with `download` (and only when it is not there already)."""
    name = torchvision_name(name)
    parts = [_open_torchvision(name, root, arguments, download) for arguments in TORCHVISION_DATASETS[name][1]]
    # class key -> items; Omniglot's two parts have separate label spaces, the others share one
    classes: dict[tuple[int, int], list[tuple[object, int]]] = {}
    for part_index, (dataset, labels, _) in enumerate(parts):
        for item, label in enumerate(labels):
            key = (part_index if name == "omniglot" else 0, label)
            classes.setdefault(key, []).append((dataset, item))
    keys = sorted(classes)
    hierarchies: dict[Partition, Hierarchy] = {}
    if name == "omniglot":
        alphabet = {key: parts[key[0]][2][key[1]] for key in keys}
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
        except UNREADABLE_IMAGE as error:
            raise DataError(f"cannot read image {index} of torchvision {name} under {root} "
                            f"({_why_unreadable(error)}); the copy there is damaged") from None

    default_split: Split = "id" if chosen["train"] else "ood"
    return ImageListSource(name, split or default_split, {p: [classes[k] for k in chosen[p]] for p in PARTITIONS},
                           read, hierarchies, {p: [f"{part}/{label}" for part, label in chosen[p]] for p in PARTITIONS})


# --- § 3 Meta-Dataset in PMF's h5 layout -------------------------------------------------------------


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
        self._forget_handles()

    def _forget_handles(self) -> None:
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()  # threads of one process may read at once
        self._pid = os.getpid()

    def read(self, path: Path, record: int) -> np.ndarray:
        import h5py

        if self._pid != os.getpid():  # a forked data worker: open its own files, never use the parent's
            self._forget_handles()
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
    """One Meta-Dataset source in PMF's h5 layout [PMF's Meta-Dataset h5 conversion]: DIR/dataset_spec.json and one
    DIR/<class_id>.h5 per class. Class ids are contiguous: train first, then valid, then test.
    Omniglot's spec gives alphabets (bilevel hierarchy); ImageNet's its WordNet DAG per split."""
    try:
        import h5py  # noqa: F401  (optional extra)
    except ImportError:
        raise DataError("h5 sources need h5py: pip install -e '.[h5]' from the repository root") from None
    spec_path = directory / "dataset_spec.json"
    if not spec_path.is_file():
        raise DataError(f"{spec_path} does not exist; expected a Meta-Dataset source folder in PMF's h5 "
                        f"layout{_mark_hint(directory)}")
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
    names = {p: [str(c) for c in range(int(starts[k]), int(starts[k + 1]))] for k, p in enumerate(PARTITIONS)}
    source = ImageListSource(directory.name, split or default_split, partitions, read, hierarchies, names)
    source.files = files  # exposed so callers (and tests) can see how many handles are open
    return source


# --- § 4 One string for all sources ---------------------------------------------------------------


def _mark_hint(path: Path) -> str:
    """For a missing path with an "@" in it: the split marks there are."""
    return f"; if @{str(path).rsplit('@', 1)[1]} was meant as a split mark, use @id or @ood" if "@" in str(path) else ""


def _split_mark(part: str) -> tuple[str, str]:
    """(source, mark) of one comma-separated part: only a trailing @id or @ood is a split mark, so a
    path may hold "@" (folder:/data/d@v2). A name that is no path (embedded@both) with an "@" has an
    unknown mark."""
    for mark in ("id", "ood"):
        if part.endswith("@" + mark):
            return part[: -len(mark) - 1], mark
    kind = part.partition(":")[0]
    if "@" in part and kind not in ("folder", "torchvision", "h5"):
        raise DataError(f"unknown split mark @{part.rsplit('@', 1)[1]} in {part!r}; use @id or @ood")
    return part, ""


REAL_KINDS = ("folder", "torchvision", "h5")  # the sources --data reads from disk, each marked @id or @ood


def check_marked(spec: str) -> None:
    """A --data string from a command line: every real source (folder:, torchvision:, h5:) ends in @id
    or @ood, as the README promises; only the embedded benchmark's domains, whose splits it defines,
    go unmarked. An unmarked one is a DataError naming it and the marks."""
    for part in (p.strip() for p in spec.split(",")):
        if part.partition(":")[0] in REAL_KINDS and not _split_mark(part)[1]:
            raise DataError(f"data source {part!r} has no split mark{_mark_hint(Path(part))}; end it in @id "
                            f"(in-distribution: its classes split into train, val and test classes) or @ood "
                            f"(out-of-distribution: every class a test class)")


def parse_data_spec(spec: str, image_size: int, cache_dir: Path | None = None, seed: int = 0) -> list[Source]:
    """Sources named by one string: "embedded" (default; or "embedded:NAME" for one domain),
    "folder:PATH", "torchvision:NAME:ROOT" (NAME a key of TORCHVISION_DATASETS or torchvision's class
    name; "torchvision:NAME:ROOT:download=1" downloads it if it is not there), "h5:PATH/SOURCE", joined
    by commas, each ending in "@id" or "@ood" (a command line checks it: `check_marked`). Embedded
    domains keep their own split unless marked. A real source without a mark, as runs recorded before
    marks were required may hold, is ID when it has train classes, OOD otherwise. `seed` fixes seeded
    class splits of folders and torchvision datasets; keep it constant to compare runs."""
    if image_size < 8:
        raise DataError(f"image size {image_size} is too small; use at least 8 pixels")
    sources: list[Source] = []
    for part in (p.strip() for p in spec.split(",")):
        body, mark = _split_mark(part)
        split: Split | None = mark or None
        kind, _, rest = body.partition(":")
        if kind == "embedded":
            found = benchmark.embedded_sources(benchmark.EMBEDDED_SEED, cache_dir=cache_dir)
            if rest:
                found = [s for s in found if s.name == rest]
                if not found:
                    raise DataError(f"unknown embedded domain {rest!r}; valid: {', '.join(benchmark.EMBEDDED_DOMAINS)}")
            for source in found:
                source.split = split or source.split
        elif kind == "folder" and rest:
            found = folder_sources(Path(rest).expanduser(), split, seed)
        elif kind == "torchvision" and ":" in rest:
            download = rest.endswith(":download=1")
            name, _, root = rest.removesuffix(":download=1").partition(":")
            found = [torchvision_source(name, Path(root).expanduser(), split, seed, download)]
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
