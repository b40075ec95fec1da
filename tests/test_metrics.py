import numpy as np
import pytest

from distributed_je.metrics import balanced_accuracy, knn_predict, knn_vote_share, roc_auc


def test_balanced_accuracy_by_hand():
    true = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 1, 1, 0])
    # class 0: 3/4 right, class 1: 1/2 right
    assert balanced_accuracy(true, predicted) == pytest.approx((0.75 + 0.5) / 2)
    assert balanced_accuracy(true, true) == 1.0


def test_knn_by_hand():
    reference = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    labels = np.array([0, 0, 0, 1, 1])
    query = np.array([[0.05, 0.05], [4.9, 5.0], [3.0, 3.0]])
    assert knn_predict(reference, labels, query, k=1).tolist() == [0, 1, 1]
    # k=5: majority is class 0 everywhere
    assert knn_predict(reference, labels, query, k=5).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="k=6 is out of range"):
        knn_predict(reference, labels, query, k=6)


def test_vote_shares_by_hand():
    reference = np.array([[0.0], [1.0], [2.0], [10.0]])
    shares = knn_vote_share(reference, np.array([0, 0, 1, 1]), 2, np.array([[0.9], [9.0]]), k=3)
    np.testing.assert_allclose(shares, [[2 / 3, 1 / 3], [1 / 3, 2 / 3]])


def test_roc_auc_by_hand():
    positive = np.array([True, True, False, False])
    assert roc_auc(positive, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert roc_auc(positive, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie -> 1/2, (0.5, 0.1) -> 1, (0.3, 0.5) -> 0, (0.3, 0.1) -> 1
    assert roc_auc(positive, np.array([0.5, 0.3, 0.5, 0.1])) == pytest.approx(2.5 / 4)
    assert np.isnan(roc_auc(np.array([True, True]), np.array([0.1, 0.2])))


def test_neighbours_kept_by_hand():
    import torch

    from distributed_je.module import neighbours_kept

    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert float(neighbours_kept(line, line, 1)) == 1.0
    swapped = torch.tensor([[10.0], [11.0], [2.5], [0.0], [1.0]])  # rows 0,1 trade places with 3,4
    # nearest at full depth: 0->1, 1->0, 2->1, 3->4, 4->3; after: 0->1, 1->0, 2->4 (1 is at 11), 3->4, 4->3
    assert float(neighbours_kept(line, swapped, 1)) == pytest.approx(4 / 5)
    assert torch.isnan(neighbours_kept(line[:1], line[:1], 1))
