"""The data pipeline at scale: listing-only start-up, unreadable files counted not fatal, loader
workers giving the same batches as none, the augmentation recipe chosen by input size, and
one decode per image across the stages of a run."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dsdeploy import api
from dsdeploy.data import decode
from dsdeploy.data.datasets import Preprocess, load_data, make_loader
from dsdeploy.data.loader import release_loaders, train_loader
from dsdeploy.data.store import CACHED, keep_decoded
from dsdeploy.recover.config import FinetuneConfig
from dsdeploy.recover.epoch import train_loader as recover_train_loader

PRE = Preprocess(size=(8, 8), resize=None, mean=(0.5,), std=(0.25,), channels=3)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _random_tree(root: Path, n_per_class: int, size: int = 16, classes: tuple[str, ...] = ("a", "b")) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_100k_files_start_training_after_listing_only(tmp_path):
    """100,000 tiny files (one PNG's bytes written 100,000 times): the first training step reads one batch."""
    png = _png((200, 10, 10))
    for c in ("cat", "dog"):
        folder = tmp_path / "data" / c
        folder.mkdir(parents=True)
        for i in range(50_000):
            with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
                f.write(png)
    before = decode.OPENS[0]
    splits = load_data(str(tmp_path / "data"), PRE, val_split=0.1, seed=0)
    assert len(splits.train) == 90_000 and len(splits.val) == 10_000
    assert decode.OPENS[0] == before  # listing opened no image
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = next(iter(train_loader(splits.train, 32, seed=0)))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert x.shape == (32, 3, 8, 8) and torch.isfinite(loss)
    assert decode.OPENS[0] - before == 32  # exactly the first batch was decoded


def test_unreadable_images_are_dropped_and_counted_not_fatal(tmp_path):
    _random_tree(tmp_path / "train", 10)
    _random_tree(tmp_path / "test", 4)
    for i in range(3):
        (tmp_path / "train" / "a" / f"bad{i}.png").write_bytes(b"not a png")
    (tmp_path / "test" / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    s = load_data(str(tmp_path), PRE)
    assert len(s.train) == 23 and s.skipped == 0  # listed; nothing read yet
    out = api.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), str(tmp_path), preprocess=PRE)
    assert out["images"] == 8 and out["skipped"] == 1  # the result JSON counts the bad test image
    for workers in (0, 2):
        seen = sum(len(y) for _, y in recover_train_loader(s.train, 4, seed=1, workers=workers))
        assert seen <= 20 and s.train.skipped == 3  # the epoch ran; short batches only where a file was bad
    release_loaders(s.train)  # the workers end now (left to the garbage collector they stall 5 s each)
    full = sum(len(y) for _, y in make_loader(s.train, 4, shuffle=False))
    assert full == 20 and s.skipped == 4  # 3 in train, 1 in test (found by evaluate: one listing, one state)


@pytest.mark.parametrize("size", [16, 112])
def test_workers_give_the_same_batches_as_none(tmp_path, size):
    """Order and augmentation depend only on the seed: 0 or 2 worker processes, same batches."""
    _random_tree(tmp_path, 12, size=size + 8)
    pre = Preprocess(size=(size, size), resize=None, mean=(0.5,), std=(0.25,), augment=True)
    batches = {}
    for workers in (2, 0):
        s = load_data(str(tmp_path), pre, val_split=0, seed=3)
        for epoch_seed in (7, 8):  # the second pass reuses the loader and its persistent workers
            batches[workers, epoch_seed] = list(train_loader(s.train, 5, seed=epoch_seed, workers=workers))
        if workers:
            assert s.train.store.shared
            if decode.recipe(pre) == "small":  # what the workers decoded is in the main process's cache
                assert int((s.train.store.status == CACHED).sum()) >= 20
            started = set(multiprocessing.active_children())
            assert len(started) >= 2 and release_loaders(s.train) == 1  # one loader kept for both passes
            assert not started & set(multiprocessing.active_children())  # its workers ended now, not at gc
    for epoch_seed in (7, 8):
        a, b = batches[0, epoch_seed], batches[2, epoch_seed]
        assert len(a) == len(b) == 4
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)
    assert not torch.equal(batches[0, 7][0][1], batches[0, 8][0][1])  # another epoch, another order


def test_recipe_chosen_by_input_size(tmp_path):
    from torchvision.transforms import v2

    small, large = Preprocess(size=(32, 32), resize=None), Preprocess(size=(224, 224), resize=256)
    assert decode.recipe(small) == "small" and decode.recipe(large) == "imagenet"
    kinds = lambda pre: [type(t) for t in decode.train_transform(pre).transforms]
    assert kinds(small) == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert kinds(large)[:2] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    # the ImageNet recipe crops from the whole image (not the center crop), the eval path is resize + center crop
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img = np.zeros((150, 300, 3), np.uint8)
    img[:, :40] = 255  # a white band the center crop cuts away
    for c in ("a", "b"):
        Image.fromarray(img).save(tmp_path / c / "x.png")
    pre = Preprocess(size=(112, 112), resize=128, mean=(0, 0, 0), std=(1, 1, 1), augment=True)
    s = load_data(str(tmp_path), pre, val_split=0)
    assert s.train[0][0].shape == (3, 112, 112)
    plain = load_data(str(tmp_path), Preprocess.from_dict(pre.to_dict()), val_split=0)
    assert float(plain.train[0][0].max()) == 0.0  # eval geometry: the band is cropped away
    crops = []
    for e in range(12):
        s.train.set_epoch_seed(e)
        crops.append(float(s.train[0][0].max()))
    assert max(crops) > 0.5  # some random-resized crops reach the band


def test_stages_of_a_run_decode_each_image_once(tmp_path):
    """Inside keep_decoded (what ``dsdeploy run`` wraps its stages in), a second load_data of the same
    folder and geometry, with another split and limit, reuses every image the first one decoded."""
    _random_tree(tmp_path, 10)
    with keep_decoded():
        first = load_data(str(tmp_path), PRE, val_split=0.2, seed=0)
        for split in (first.train, first.val):
            list(make_loader(split, 4, shuffle=False))
        del first, split
        before = decode.OPENS[0]
        again = load_data(str(tmp_path), PRE, val_split=0.5, seed=1, limit=6)
        n = sum(len(y) for d in (again.train, again.val) for _, y in make_loader(d, 4, shuffle=False))
        assert n == 12 and decode.OPENS[0] == before
        del again
    fresh = load_data(str(tmp_path), PRE, val_split=0.2, seed=0)  # outside: nothing kept alive
    assert not fresh.train.store.status.any()


def test_workers_is_a_validated_option():
    from dsdeploy.errors import DsdeployError

    with pytest.raises(DsdeployError, match="finetune.workers"):
        FinetuneConfig(workers=-1)
    assert "workers" not in FinetuneConfig(workers=3).trajectory()  # resume may change it


def test_interpolation_is_a_preprocessing_option(tmp_path):
    from click.testing import CliRunner

    from dsdeploy.cli import load_commands
    from dsdeploy.data.preprocessing import describe, resolve
    from dsdeploy.errors import DataError
    from dsdeploy.pipeline.recipe import recipe_from_dict

    cli = load_commands()
    for command in ("finetune", "evaluate", "calibrate", "convert", "export", "bench"):  # every data command
        params = {p.name for p in cli.commands[command].params}
        assert {"size", "resize", "mean", "std", "channels", "interpolation", *(
            ["workers"] if command in ("finetune", "evaluate", "calibrate") else [])} <= params, command
    assert "--interpolation" in CliRunner().invoke(cli, ["evaluate", "--help"]).output
    r = recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "preprocess": {"interpolation": "bicubic"}}, "r.toml")
    assert r.preprocess.interpolation == "bicubic"
    pre = resolve(None, (1, 3, 16, 16), {"interpolation": "bicubic"})
    assert pre.interpolation == "bicubic" and "bicubic" in describe(pre)
    assert Preprocess.from_dict(pre.to_dict()) == pre  # recorded with the model
    with pytest.raises(DataError, match="interpolation"):
        Preprocess(interpolation="lanczos2")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    a = decode.decode(tmp_path / "x.png", resolve(None, (1, 3, 16, 16)))
    b = decode.decode(tmp_path / "x.png", pre)
    assert a.shape == b.shape == (16, 16, 3) and not np.array_equal(a, b)


def test_dsdeploy_run_decodes_each_image_once(tmp_path):
    """calibrate, fine-tune and evaluate of one run read the same 20 images: 20 decodes, not one set per stage."""
    from dsdeploy.pipeline.runner import run_recipe

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "r.toml").write_text(f'''
[model]
spec = "tests.test_preprocessing:graynet"
input_shape = [1, 1, 16, 16]
[data]
spec = "{tmp_path / 'imgs'}"
val_split = 0.3
limit = 10
[calibrate]
batch_size = 4
workers = 0
[finetune]
epochs = 2
batch_size = 4
workers = 0
[evaluate]
workers = 0
[export]
enabled = false
''')
    before = decode.OPENS[0]
    res = run_recipe(tmp_path / "r.toml", tmp_path / "out")
    assert {res.records[s]["status"] for s in ("convert", "finetune", "evaluate")} == {"done"}
    assert decode.OPENS[0] - before == 20  # 10 train + 10 val images, each decoded once for every stage
