import math

import numpy as np
import torch

from utils import ConfusionMatrix


def test_hand_worked_three_class_example():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou, miou, acc = cm.compute()
    # class 0: TP 1, FP 1 (a 2 called 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0, FN 1 -> 0
    assert np.allclose(iou.numpy(), [1 / 3, 2 / 3, 0.0])
    assert math.isclose(miou, 1 / 3) and math.isclose(acc, 3 / 5)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    iou, miou, _ = cm.compute()
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert math.isclose(miou, (1 / 2 + 1 / 2) / 2)


def test_accumulating_batches_equals_one_big_batch():
    g = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 19, (2, 8, 8), generator=g) for _ in range(5)]
    preds = [torch.randint(0, 19, (2, 8, 8), generator=g) for _ in range(5)]
    for t in targets:
        t[t == 7] = 255
    parts, whole = ConfusionMatrix(), ConfusionMatrix()
    for t, p in zip(targets, preds):
        parts.update(t, p)
    whole.update(torch.cat(targets), torch.cat(preds))
    assert torch.equal(parts.mat, whole.mat)
    # and it is not the mean of per-batch mIoUs
    per_batch = []
    for t, p in zip(targets, preds):
        one = ConfusionMatrix()
        one.update(t, p)
        per_batch.append(one.compute()[1])
    assert not math.isclose(np.mean(per_batch), whole.compute()[1])


def test_ignored_pixels_do_not_count():
    target = torch.tensor([0, 1, 255, 255])
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(target, torch.tensor([0, 1, 0, 0]))
    b.update(target, torch.tensor([0, 1, 1, 1]))
    assert torch.equal(a.mat, b.mat) and a.mat.sum() == 2
