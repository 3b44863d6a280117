"""Episodes from image folders, in Omniglot's and mini-ImageNet's layouts, from a tiny image
tree the test generates (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from metagrad.tasks import EpisodicTask, ImageFolderFewShot


def _image(path: Path, value: int, size: int = 10, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, (size, size), color).save(path)


def _tree(
    root: Path, splits: dict[str, int], per_class: int = 4, nested: bool = False, mode: str = "L"
):
    """Classes whose images all have one gray level (class k: 10 k + image index)."""
    k = 0
    for split, classes in splits.items():
        for c in range(classes):
            folder = root / split / (f"alphabet{c % 2}/char{c}" if nested else f"class{c}")
            for i in range(per_class):
                _image(folder / f"{i}.png", 10 * k + i, mode=mode)
            k += 1


def test_mini_imagenet_layout(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": 6, "val": 3, "test": 4}, mode="RGB")
    task = ImageFolderFewShot(
        str(tmp_path), ways=3, shots=1, query=2, image_size=8, grayscale=False
    )
    assert isinstance(task, EpisodicTask)
    assert {s: len(f) for s, f in task.class_folders.items()} == {"train": 6, "val": 3, "test": 4}
    sx, sy, qx, qy = task.episodes("train", 5, seed=0)
    assert sx.shape == (5, 3, 3, 8, 8) and qx.shape == (5, 6, 3, 8, 8)
    assert sy.shape == (5, 3) and qy.shape == (5, 6) and 0 <= sx.min() and sx.max() <= 1
    # Every image of one label in one task comes from one class (one gray level band).
    for t in range(5):
        for label in range(3):
            levels = torch.cat([sx[t][sy[t] == label], qx[t][qy[t] == label]])[:, 0, 0, 0] * 255
            assert (levels // 10).unique().numel() == 1
    assert task.model_args() == {
        "in_channels": 3,
        "image_size": 8,
        "num_classes": 3,
        "in_features": 192,
        "out_features": 3,
    }


def test_omniglot_layout_with_nested_alphabets_and_rotations(tmp_path: Path) -> None:
    _tree(tmp_path, {"images_background": 4, "images_evaluation": 3}, nested=True)
    task = ImageFolderFewShot(str(tmp_path), ways=2, shots=1, query=1, image_size=6, rotations=True)
    assert len(task.class_folders["train"]) == 4 and len(task.class_folders["test"]) == 3
    assert len(task.pools("train")) == 16, "each rotation is a class of its own in train"
    assert len(task.pools("test")) == 3, "test classes are not rotated"
    val = task.episodes("val", 2, seed=0)  # no val folders: drawn from the test classes
    assert val.support_x.shape == (2, 2, 1, 6, 6)


def test_flat_layout_is_split_by_a_seed(tmp_path: Path) -> None:
    _tree(tmp_path, {"": 10})
    task = ImageFolderFewShot(
        str(tmp_path), ways=2, shots=1, query=1, split_fractions=(0.6, 0.2, 0.2)
    )
    folders = task.class_folders
    assert [len(folders[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert not set(folders["train"]) & set(folders["test"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(root="missing"), FileNotFoundError, "does not exist"),
        (dict(ways=9), ValueError, "Invalid ways: 9"),
        (dict(shots=3, query=3), ValueError, "fewer than shots \\+ query"),
        (dict(split_fractions=(0.5, 0.5, 0.5)), ValueError, "split_fractions"),
    ],
    ids=["missing-root", "too-many-ways", "too-few-images", "fractions"],
)
def test_bad_arguments(tmp_path: Path, kwargs, error, message) -> None:
    _tree(tmp_path / "data", {"train": 3, "test": 3})
    args = dict(root=str(tmp_path / "data"), ways=2, shots=1, query=1)
    args.update(kwargs)
    if args["root"] == "missing":
        args["root"] = str(tmp_path / "missing")
    with pytest.raises(error, match=message):
        task = ImageFolderFewShot(**args)
        task.episodes("train", 1, seed=0)
