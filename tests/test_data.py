"""dsdeploy.data.datasets: digits and image folders, splits, skipping, determinism, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsdeploy.data.datasets import (
    DIGITS_PREPROCESS,
    ImageDataset,
    Preprocess,
    load_data,
    make_loader,
)
from dsdeploy.errors import DataError

PRE = Preprocess(size=(8, 8), resize=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels=3)


def _img(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _tree(root: Path, classes: dict[str, tuple[int, int, int]], n: int) -> None:
    for name, color in classes.items():
        for i in range(n):
            _img(root / name / f"{i}.png", color)


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def test_digits_split_shapes_and_classes():
    splits = load_data("digits")
    assert splits.classes == [str(i) for i in range(10)]
    assert len(splits.train) + len(splits.val) == 1797
    assert abs(len(splits.val) - 0.2 * 1797) <= 1
    x, y = splits.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert splits.preprocess == DIGITS_PREPROCESS
    # stratified: every class is in val with about its share
    counts = np.bincount(splits.val.labels, minlength=10)
    assert counts.min() >= 30
    # normalised with the preprocessing's mean/std
    raw = torch.stack([splits.train[i][0] for i in range(200)])
    assert abs(float(raw.mean())) < 0.3 and 0.7 < float(raw.std()) < 1.3


def test_digits_three_channels_and_size():
    pre = Preprocess(size=(32, 32), resize=None, mean=(0.3,), std=(0.32,), channels=3)
    x, _ = load_data("digits", pre, limit=10).val[0]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[2])


def test_digits_deterministic_and_seed_dependent():
    a, b, c = load_data("digits", seed=3), load_data("digits", seed=3), load_data("digits", seed=4)
    assert a.val.labels == b.val.labels and torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)


def test_limit_caps_each_split():
    s = load_data("digits", limit=25)
    assert len(s.train) == 25 and len(s.val) == 25


def test_class_tree_split_skips_corrupt_and_non_images(tmp_path, caplog):
    _tree(tmp_path, COLORS, 10)
    (tmp_path / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "green" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    with caplog.at_level(logging.WARNING, logger="dsdeploy.data.datasets"):
        s = load_data(str(tmp_path), PRE, val_split=0.2, seed=0)
        assert s.classes == ["blue", "green", "red"]
        assert s.skipped == 1  # the text file, found by the scan
        assert len(s.train) + len(s.val) == 31  # listed, not read: the corrupt jpeg is found when read
        read = sum(len(y) for d in (s.train, s.val) for _, y in make_loader(d, 4, shuffle=False))
        assert read == 30  # the loaders drop it
    assert s.skipped == 2
    assert "skipped 1 non-image" in caplog.text and "skipped 1 corrupt" in caplog.text
    assert len(s.val) in (5, 6)  # 31 images found, 6 held out (stratified) before decoding
    assert sorted(np.bincount(s.val.labels).tolist())[1:] == [2, 2]
    x, y = s.val[0]
    assert x.shape == (3, 8, 8)
    # a solid colour image normalises to exact per-channel values
    expected = (torch.tensor(COLORS[s.classes[y]], dtype=torch.float32) / 255 - 0.5) / 0.25
    assert torch.allclose(x[:, 4, 4], expected, atol=1e-6)


def test_unused_split_is_never_decoded(tmp_path):
    _tree(tmp_path / "train", COLORS, 3)
    _tree(tmp_path / "test", COLORS, 2)
    (tmp_path / "train" / "red" / "bad.png").write_bytes(b"garbage")
    s = load_data(str(tmp_path), PRE)
    assert sum(len(y) for _, y in make_loader(s.val, 4, shuffle=False)) == 6 and s.skipped == 0
    assert not s.train.store.status[torch.from_numpy(s.train.ids)].any()  # train untouched
    assert sum(len(y) for _, y in make_loader(s.train, 4, shuffle=False)) == 9 and s.skipped == 1
    assert s.train.store.images.shape == (16, 3, 8, 8)  # one cache for the listing, filled as read


def test_imagefolder_train_test_layout(tmp_path):
    _tree(tmp_path / "train", COLORS, 4)
    _tree(tmp_path / "test", {"red": COLORS["red"], "blue": COLORS["blue"]}, 2)
    s = load_data(str(tmp_path), PRE)
    assert s.classes == ["blue", "green", "red"]
    assert len(s.train) == 12 and len(s.val) == 4
    assert sorted(set(s.val.labels)) == [0, 2]


def test_val_folder_and_grayscale_resize(tmp_path):
    _tree(tmp_path / "train", COLORS, 2)
    _tree(tmp_path / "val", COLORS, 1)
    pre = Preprocess(size=(4, 6), resize=None, mean=(0.5,), std=(0.5,), channels=1)
    s = load_data(str(tmp_path), pre)
    assert len(s.val) == 3 and s.val[0][0].shape == (1, 4, 6)


def test_resize_then_center_crop(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :4] = 255  # a white band at the left edge: cropped away by the center crop
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(img).save(tmp_path / c / "x.png")
    pre = Preprocess(size=(10, 10), resize=10, mean=(0, 0, 0), std=(1, 1, 1))
    x, _ = load_data(str(tmp_path), pre, val_split=0).train[0]
    assert x.shape == (3, 10, 10) and float(x.max()) == 0.0


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        _img(tmp_path / f"{i}.jpg", (10 * i, 0, 0))
    (tmp_path / "readme.md").write_text("hi")
    s = load_data(str(tmp_path), PRE, labelled=False, val_split=0)
    assert s.classes is None and s.val is None and s.skipped == 1
    assert len(s.train) == 5 and {s.train[i][1] for i in range(5)} == {-1}
    with pytest.raises(DataError, match="no class folders"):
        load_data(str(tmp_path), PRE)


def test_augment_train_only_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(6):
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    pre = Preprocess(size=(16, 16), resize=None, mean=(0.5,), std=(0.5,), augment=True)
    a = load_data(str(tmp_path), pre, seed=1)
    b = load_data(str(tmp_path), pre, seed=1)
    plain = load_data(str(tmp_path), Preprocess.from_dict(pre.to_dict()), seed=1)
    def draws(s):  # item 0 in 8 epochs
        return torch.stack([s.train.set_epoch_seed(e) or s.train[0][0] for e in range(8)])

    xa, xb = draws(a), draws(b)
    assert torch.equal(xa, xb)  # same seeds, same augmentation
    assert torch.equal(a.train[0][0], a.train[0][0])  # a function of (epoch seed, index): rereads agree
    assert len({tuple(v.flatten().tolist()) for v in xa}) > 1  # augmentation changes the image
    assert torch.equal(a.val[0][0], plain.val[0][0])  # never on val


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no images"),
    (lambda p: (p / "only").mkdir(parents=True) or _img(p / "only" / "a.png", (1, 2, 3)), "only one class"),
])
def test_errors(tmp_path, make, match):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=match):
        load_data(str(root), PRE)


def test_all_images_corrupt_is_an_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"garbage")
    s = load_data(str(tmp_path), PRE, val_split=0)
    assert len(s.train) == 2  # listed only
    with pytest.raises(DataError, match="no readable images"):
        list(make_loader(s.train, 1, shuffle=False))
    assert s.skipped == 2


def test_preprocess_roundtrip_and_validation():
    pre = Preprocess(size=(32, 32), resize=None, mean=(0.1, 0.2, 0.3), std=(1, 2, 3), channels=3)
    d = pre.to_dict()
    assert d["size"] == [32, 32] and d["layout"] == "NCHW" and d["channels"] == 3
    assert Preprocess.from_dict(d) == pre
    with pytest.raises(DataError):
        Preprocess(mean=(0.1, 0.2), std=(1, 1, 1))
    with pytest.raises(DataError):
        Preprocess(channels=2)


def test_lazy_file_dataset_matches_cache(tmp_path, monkeypatch):
    _tree(tmp_path, COLORS, 3)
    cached = load_data(str(tmp_path), PRE, val_split=0)
    first = [x for x, _ in make_loader(cached.train, 3, shuffle=False)]  # decoded into the cache as read
    assert cached.train.store.cacheable and cached.train.store.images is not None
    monkeypatch.setattr("dsdeploy.data.store.CACHE_BYTES", 0)
    lazy = load_data(str(tmp_path), PRE, val_split=0, seed=1)  # another store: another geometry key is not
    lazy.train.store = type(lazy.train.store)(lazy.train.store.files, PRE)  # needed; a fresh uncached one
    assert len(lazy.train) == len(cached.train) == 9
    assert lazy.train.files is not None and not lazy.train.store.cacheable
    for i in range(len(cached.train)):
        assert torch.equal(cached.train[i][0], lazy.train[i][0])
    assert torch.equal(torch.cat(first), torch.cat([x for x, _ in make_loader(cached.train, 3, shuffle=False)]))
    assert lazy.train.store.images is None


def test_make_loader_order_depends_on_seed():
    ds = ImageDataset(list(range(20)), DIGITS_PREPROCESS, images=torch.zeros(20, 1, 16, 16))
    order = lambda seed: torch.cat([y for _, y in make_loader(ds, 6, shuffle=True, seed=seed)]).tolist()  # noqa
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(20))
    assert torch.cat([y for _, y in make_loader(ds, 6, shuffle=False)]).tolist() == list(range(20))
