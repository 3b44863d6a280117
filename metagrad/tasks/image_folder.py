"""N-way K-shot tasks from a folder of images: Omniglot's and mini-ImageNet's layouts.

A *class* is a folder that directly holds image files; classes may sit at any depth
(Omniglot nests characters in alphabets). The splits come from the folder names under `root`:

* `train/`, `val/`, `test/` (mini-ImageNet as usually distributed; `val` is optional);
* `images_background/` (meta-training) and `images_evaluation/` (meta-test), Omniglot's two
  archives, unpacked side by side;
* otherwise every class under `root` is assigned to train/val/test at random (seeded by
  `split_seed`) in the proportions `split_fractions`.

Nothing is downloaded: point `root` at data you have (the README says where to get it).
Images are decoded with Pillow (`pip install "metagrad[images]"`), resized to `image_size`,
optionally converted to grayscale, scaled to [0, 1], and kept in memory once loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._checks import ArgumentError, check_count, check_number
from .digits import sample_episodes
from .protocols import SPLITS, TaskBatch
from .sinusoid import split_seed

__all__ = ["ImageFolderFewShot", "IMAGE_SUFFIXES"]

#: File suffixes read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_NAMED_SPLITS = {"train": "train", "val": "val", "test": "test"}
_OMNIGLOT = {"train": "images_background", "test": "images_evaluation"}


def _classes_under(folder: Path) -> list[Path]:
    """Every folder below `folder` (itself included) that directly holds image files, sorted."""
    found = []
    for d in sorted([folder, *(p for p in folder.rglob("*") if p.is_dir())]):
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir() if f.is_file()):
            found.append(d)
    return found


class ImageFolderFewShot:
    """Episodic few-shot classification from image folders (the `EpisodicTask` protocol).

    Args:
        root: the data folder (see the module docstring for the layouts it understands).
        ways: classes per task (N).
        shots: support images per class (K).
        query: query images per class.
        image_size: images are resized to `image_size` x `image_size` (28 for Omniglot, 84 for
            mini-ImageNet in the usual setups).
        grayscale: convert to one channel (Omniglot); False keeps three (RGB).
        rotations: in the train split, each 90-degree rotation of a class is a class of its
            own (the usual Omniglot augmentation); val and test classes are never rotated.
        split_fractions: train/val/test shares of the classes when `root` has no split
            folders.
        split_seed: seed of that random assignment of classes.
        invert: use 1 - pixel (Omniglot's strokes are black on white).

    Raises:
        FileNotFoundError: `root` does not exist or holds no images.
        ValueError: a split has fewer than `ways` classes, or a class fewer than
            `shots + query` images.
    """

    def __init__(
        self,
        root: str,
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        image_size: int = 28,
        grayscale: bool = True,
        rotations: bool = False,
        split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        invert: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; download the data set and point "
                "task.root at the unpacked folder"
            )
        self.ways = check_count(ways, "ways")
        self.shots = check_count(shots, "shots")
        self.query = check_count(query, "query")
        self.image_size = check_count(image_size, "image_size")
        self.grayscale = bool(grayscale)
        self.rotations = bool(rotations)
        self.invert = bool(invert)
        fractions = [check_number(f, "split_fractions", 0.0, 1.0) for f in split_fractions]
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
            raise ArgumentError(
                "split_fractions",
                f"Invalid split_fractions: {list(split_fractions)} (three shares summing to 1)",
            )
        self.class_folders = self._find_splits(fractions, int(split_seed))
        for split, folders in self.class_folders.items():
            if folders and len(folders) * (4 if split == "train" and self.rotations else 1) < ways:
                raise ArgumentError(
                    "ways",
                    f"Invalid ways: {ways} exceeds the {len(folders)} classes of split "
                    f"{split!r} in {self.root}",
                )
        if not self.class_folders["train"]:
            raise FileNotFoundError(f"no class folders with images under {self.root}")
        self._pools: dict[str, list[Tensor]] = {}

    def _find_splits(self, fractions: list[float], seed: int) -> dict[str, list[Path]]:
        present = {s: self.root / d for s, d in _NAMED_SPLITS.items() if (self.root / d).is_dir()}
        if "train" not in present:
            present = {s: self.root / d for s, d in _OMNIGLOT.items() if (self.root / d).is_dir()}
        if "train" in present:
            return {s: _classes_under(present[s]) if s in present else [] for s in SPLITS}
        classes = _classes_under(self.root)
        order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
        n_train = round(fractions[0] * len(classes))
        n_val = round(fractions[1] * len(classes))
        picked = [classes[i] for i in order.tolist()]
        return {
            "train": sorted(picked[:n_train]),
            "val": sorted(picked[n_train : n_train + n_val]),
            "test": sorted(picked[n_train + n_val :]),
        }

    def _load(self, folder: Path) -> Tensor:
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover - Pillow ships with matplotlib
            raise ImportError(
                'reading image folders needs Pillow: pip install "metagrad[images]"'
            ) from e
        mode = "L" if self.grayscale else "RGB"
        out = []
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as opened:
                    img = opened.convert(mode).resize((self.image_size, self.image_size))
                    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            except OSError as e:
                raise OSError(f"could not read image {f}: {e}") from None
            x = data.reshape(self.image_size, self.image_size, -1).permute(2, 0, 1) / 255.0
            out.append(1 - x if self.invert else x)
        if len(out) < self.shots + self.query:
            raise ArgumentError(
                "query",
                f"Invalid shots + query: class folder {folder} has {len(out)} images, fewer "
                f"than shots + query = {self.shots + self.query}",
            )
        return torch.stack(out)

    def pools(self, split: str) -> list[Tensor]:
        """The images of each class of `split` ([images, C, H, W] each), loaded once."""
        if split not in self._pools:
            folders = self.class_folders[split] or self.class_folders["test"]
            pools = [self._load(f) for f in folders]
            if split == "train" and self.rotations:
                pools = [torch.rot90(p, k, dims=(2, 3)) for p in pools for k in range(4)]
            self._pools[split] = pools
        return self._pools[split]

    def episodes(self, split: str, count: int, seed: int) -> TaskBatch:
        """`count` tasks of `split`; a missing val split draws from the test classes."""
        g = torch.Generator().manual_seed(split_seed(seed, split))
        return sample_episodes(self.pools(split), self.ways, self.shots, self.query, count, g)

    def model_args(self) -> dict[str, Any]:
        """Input and output sizes for the built-in models."""
        channels = 1 if self.grayscale else 3
        return {
            "in_channels": channels,
            "image_size": self.image_size,
            "num_classes": self.ways,
            "in_features": channels * self.image_size**2,
            "out_features": self.ways,
        }

    def __repr__(self) -> str:
        counts = {s: len(f) for s, f in self.class_folders.items()}
        return (
            f"ImageFolderFewShot({self.root}, classes={counts}, {self.ways}-way {self.shots}-shot)"
        )
