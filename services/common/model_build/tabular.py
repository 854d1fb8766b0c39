"""Builds the tabular classifier Triton serves: breast-cancer scikit-learn pipeline -> ONNX.

Output: model_repository/tabular_classifier/1/model.onnx, with input `features` float32 [N, 30]
and outputs `label` int64 [N] and `probabilities` float32 [N, 2] (class 0 = malignant,
1 = benign). Idempotent: a marker in the cache dir records the hash of what was built.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from services.common.model_build import build_lock

MODEL_NAME = "tabular_classifier"
NUM_FEATURES = 30
# Bump when the recipe changes so existing builds are redone.
RECIPE_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[3]

ProgressFn = Callable[[str], None]


def _ignore_progress(_: str) -> None:
    return None


@dataclass(frozen=True)
class TabularData:
    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray


def load_data() -> TabularData:
    """The breast-cancer dataset (bundled with scikit-learn, no download), split 75/25."""
    features, labels = load_breast_cancer(return_X_y=True)
    # float32 end to end: the ONNX input is float32, so train on exactly what is served.
    features = features.astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return TabularData(train_x, train_y, test_x, test_y)


def train_pipeline(data: TabularData) -> Pipeline:
    """Deterministic (lbfgs, fixed split), so tests can retrain it to compare with Triton."""
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return pipeline.fit(data.train_features, data.train_labels)


def onnx_path(repo_root: Path = REPO_ROOT) -> Path:
    return repo_root / "model_repository" / MODEL_NAME / "1" / "model.onnx"


def _marker_path(repo_root: Path) -> Path:
    return repo_root / ".cache" / "models" / f"{MODEL_NAME}.built.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_built(repo_root: Path) -> bool:
    model_path, marker_path = onnx_path(repo_root), _marker_path(repo_root)
    if not (model_path.is_file() and marker_path.is_file()):
        return False
    marker = json.loads(marker_path.read_text())
    return marker.get("recipe_version") == RECIPE_VERSION and marker.get("sha256") == _sha256(model_path)


def build_tabular(repo_root: Path = REPO_ROOT, progress: ProgressFn = _ignore_progress) -> Path:
    """Trains and converts the classifier unless a valid build exists; returns the ONNX path."""
    model_path = onnx_path(repo_root)
    with build_lock(_marker_path(repo_root)):
        if _is_built(repo_root):
            progress(f"tabular: up to date ({model_path})")
        else:
            _build_tabular(repo_root, progress)
    return model_path


def _build_tabular(repo_root: Path, progress: ProgressFn) -> None:
    # Imported here: skl2onnx is only needed when (re)building.
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model_path = onnx_path(repo_root)
    progress("tabular: training StandardScaler + LogisticRegression on breast_cancer")
    data = load_data()
    pipeline = train_pipeline(data)
    accuracy = float(pipeline.score(data.test_features, data.test_labels))
    progress(f"tabular: held-out accuracy {accuracy:.4f}")

    # zipmap off: probabilities as a plain float32 [N, 2] tensor instead of a list of dicts.
    onnx_model = to_onnx(
        pipeline,
        initial_types=[("features", FloatTensorType([None, NUM_FEATURES]))],
        options={"zipmap": False},
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed: a running Triton never reads a half-written file.
    partial = model_path.with_name(".model.partial.onnx")
    partial.write_bytes(onnx_model.SerializeToString())
    os.replace(partial, model_path)

    marker_path = _marker_path(repo_root)
    marker_path.parent.mkdir(parents=True, exist_ok=True)
    marker = {"recipe_version": RECIPE_VERSION, "sha256": _sha256(model_path), "accuracy": accuracy}
    marker_path.write_text(json.dumps(marker, indent=2))
    progress(f"tabular: wrote {model_path}")


def held_out_accuracy(repo_root: Path = REPO_ROOT) -> float | None:
    """Accuracy recorded when the model was built (None when there is no valid build)."""
    if not _is_built(repo_root):
        return None
    return float(json.loads(_marker_path(repo_root).read_text())["accuracy"])


def main() -> int:
    model_path = build_tabular(REPO_ROOT, progress=print)
    print(f"tabular: {model_path} (held-out accuracy {held_out_accuracy(REPO_ROOT):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
