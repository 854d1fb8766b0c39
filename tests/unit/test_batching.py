import numpy as np

from services.common.domain import TensorData
from services.router.batching import _Pending, merge_inputs, split_outputs


def pending(rows: np.ndarray) -> _Pending:
    tensor = TensorData("features", "FP32", rows.shape, rows.astype("<f4").tobytes())
    return _Pending([tensor], rows.shape[0], "id", None, None)  # type: ignore[arg-type]


def test_merge_then_split_gives_each_request_its_own_rows_back() -> None:
    parts = [np.arange(6, dtype="<f4").reshape(2, 3), np.full((1, 3), 7, "<f4"), np.ones((3, 3), "<f4")]
    merged = merge_inputs([pending(p) for p in parts])
    assert merged[0].shape == (6, 3)
    stacked = np.frombuffer(merged[0].data, "<f4").reshape(6, 3)
    np.testing.assert_array_equal(stacked, np.concatenate(parts))

    # a model answering one int64 label and two float probabilities per row
    labels = TensorData("label", "INT64", (6, 1), np.arange(6, dtype="<i8").tobytes())
    probs = TensorData("probabilities", "FP32", (6, 2), np.arange(12, dtype="<f4").tobytes())
    per_request = split_outputs([labels, probs], [2, 1, 3])
    assert [[t.shape for t in outs] for outs in per_request] == [[(2, 1), (2, 2)], [(1, 1), (1, 2)], [(3, 1), (3, 2)]]
    assert np.frombuffer(per_request[1][0].data, "<i8").tolist() == [2]
    assert np.frombuffer(per_request[2][1].data, "<f4").tolist() == [6, 7, 8, 9, 10, 11]
