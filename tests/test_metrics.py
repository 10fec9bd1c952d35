"""dsdeploy.recover.metrics against hand-computed values, and predict on a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dsdeploy.data.datasets import load_data, make_loader
from dsdeploy.errors import DataError, DsdeployError
from dsdeploy.recover.metrics import classification_metrics, evaluate, predict, top1


def test_hand_computed_three_classes():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, labels=["a", "b", "c"])
    assert m["n"] == 6 and m["top1"] == pytest.approx(4 / 6)
    # precision: a 2/2, b 1/2, c 1/2; recall: a 2/3, b 1/2, c 1/1
    assert [c["precision"] for c in m["per_class"]] == pytest.approx([1.0, 0.5, 0.5])
    assert [c["recall"] for c in m["per_class"]] == pytest.approx([2 / 3, 0.5, 1.0])
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert [c["f1"] for c in m["per_class"]] == pytest.approx(f1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["labels"] == ["a", "b", "c"] and [c["support"] for c in m["per_class"]] == [3, 2, 1]
    assert m["top5"] is None  # no scores


def test_top5_from_scores():
    scores = np.zeros((4, 7))
    order = np.arange(7)[::-1].astype(float)  # class 0 highest ... class 6 lowest
    scores[:] = order
    y_true = [0, 4, 5, 6]  # in top-5: 0, 4; not: 5, 6
    m = classification_metrics(y_true, scores.argmax(1), scores)
    assert m["top1"] == pytest.approx(0.25) and m["top5"] == pytest.approx(0.5)
    assert len(m["confusion"]) == 7  # all score columns are classes
    # few classes: no top-5
    assert classification_metrics([0, 1], [0, 1], np.eye(2))["top5"] is None


def test_macro_ignores_classes_absent_from_ground_truth():
    m = classification_metrics([0, 0, 1], [0, 2, 1], labels=["a", "b", "c"])
    # c never occurs in y_true: macro over a, b only; c still in the confusion matrix
    assert m["recall"] == pytest.approx((0.5 + 1) / 2)
    assert m["precision"] == pytest.approx((1 + 1) / 2)
    assert m["confusion"][0] == [1, 0, 1]


def test_errors():
    with pytest.raises(DataError, match="unlabelled"):
        classification_metrics([-1, 0], [0, 0])
    with pytest.raises(DataError, match="no samples"):
        classification_metrics([], [])
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0])


def test_predict_restores_mode_and_matches_direct_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10), nn.Dropout(0.5))
    data = load_data("digits", limit=40).val
    model.train()
    y, scores = predict(model, make_loader(data, 16, shuffle=False))
    assert model.training  # restored
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    assert scores.shape == (40, 10) and np.allclose(scores, ref, atol=1e-6)
    assert y.tolist() == data.labels


def test_predict_rejects_non_classifier():
    data = load_data("digits", limit=4).val
    with pytest.raises(DsdeployError, match="classifiers only"):
        predict(nn.Identity(), make_loader(data, 4, shuffle=False))


def test_evaluate_is_top1_of_predict_over_labelled_items_only():
    """The training loops' accuracy and predict share one loop: the same model and loader give the same top-1;
    unlabelled items (-1) do not count, no labels at all -> None, max_batches stops early."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    data = load_data("digits", limit=40).val
    loader = make_loader(data, 16, shuffle=False)
    y, scores = predict(model, loader)
    assert evaluate(model, loader) == pytest.approx(float((scores.argmax(1) == y).mean()))
    half = [(x, torch.where(torch.arange(len(t)) % 2 == 0, t, -1)) for x, t in loader]
    keep = np.arange(len(y)) % 16 % 2 == 0
    assert evaluate(model, half) == pytest.approx(float((scores.argmax(1) == y)[keep].mean()))
    assert evaluate(model, [(x, torch.full_like(t, -1)) for x, t in loader]) is None
    assert evaluate(model, loader, max_batches=1) == pytest.approx(float((scores[:16].argmax(1) == y[:16]).mean()))
    assert top1(y, scores.argmax(1)) == (int((scores.argmax(1) == y).sum()), len(y))
