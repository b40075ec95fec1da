import numpy as np
import pytest

from distributed_je.metrics import balanced_accuracy, knn_predict


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
