"""A Node.js client (@grpc/grpc-js + proto-loader, built from protos/ only) against the real mesh.

It proves the public API is usable from another language: raw little-endian tensors, server
streaming with usage in the final message, and auth errors as proper gRPC status codes.
The client is tests/crosslang/client.mjs; scripts/setup.sh installs its pinned npm packages.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from typing import Any

import pytest

from services.common.settings import REPO_ROOT

CROSSLANG_DIR = REPO_ROOT / "tests" / "crosslang"
CLIENT = CROSSLANG_DIR / "client.mjs"
NODE = shutil.which("node")
UNAUTHENTICATED = 16
CLIENT_TIMEOUT_S = 180

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        NODE is None,
        reason="Node.js is not installed: install Node.js >= 18 and npm (Debian: apt-get install -y nodejs npm), "
        "then run scripts/setup.sh",
    ),
]


def _missing_npm_packages() -> list[str]:
    packages = ("@grpc/grpc-js", "@grpc/proto-loader")
    return [name for name in packages if not (CROSSLANG_DIR / "node_modules" / name / "package.json").is_file()]


@pytest.fixture(scope="module")
def node_result(mesh_endpoint: Any) -> dict[str, Any]:
    """Runs the Node client once against the mesh and returns its JSON report."""
    missing = _missing_npm_packages()
    assert not missing, (
        f"npm packages {missing} are missing in {CROSSLANG_DIR}/node_modules: run scripts/setup.sh "
        f"(or `npm ci` in {CROSSLANG_DIR})"
    )
    assert NODE is not None
    completed = subprocess.run(
        [NODE, str(CLIENT), mesh_endpoint.gateway, mesh_endpoint.api_key, "--max-tokens", "16"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, (
        f"expected one JSON line from the Node client, got {len(lines)} (exit {completed.returncode})\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    result = json.loads(lines[0])
    assert completed.returncode == 0 and result["ok"], f"Node client failed: {result}\nstderr:\n{completed.stderr}"
    return result


def test_node_client_lists_both_models(node_result: dict[str, Any]) -> None:
    kinds = {model["name"]: model["kind"] for model in node_result["models"]}
    assert kinds.get("tabular-classifier") == "tabular"
    assert kinds.get("llm") == "llm"


def test_node_predict_decodes_raw_little_endian_tensors(node_result: dict[str, Any]) -> None:
    predict = node_result["predict"]
    assert predict["prediction_id"]
    assert predict["model"] == "tabular-classifier"
    assert predict["model_version"]
    outputs = {output["name"]: output for output in predict["outputs"]}
    assert outputs["label"]["dtype"] == "INT64"
    assert outputs["label"]["shape"][0] == 1
    assert outputs["probabilities"]["dtype"] == "FP32"
    assert outputs["probabilities"]["shape"] == [1, 2]

    probabilities = predict["probabilities"]
    assert len(probabilities) == 2
    assert all(0.0 <= p <= 1.0 for p in probabilities), probabilities
    assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-4), probabilities
    assert predict["label"] in {0, 1}
    assert predict["label"] == max(range(2), key=probabilities.__getitem__)
    # The row sent is a textbook malignant case from the training data: a byte-order or layout
    # mistake on either side would not reproduce the right class with this confidence.
    assert predict["label"] == predict["expected_label"]
    assert probabilities[predict["label"]] > 0.9


def test_node_generate_streams_chunks_and_usage(node_result: dict[str, Any]) -> None:
    generate = node_result["generate"]
    assert generate["prediction_id"]
    assert generate["model"] == "llm"
    assert generate["model_version"]
    assert generate["chunks"] > 1, generate
    assert generate["indexes_in_order"], "chunk index must count 0, 1, 2, ..."
    assert generate["same_prediction_id"], "every chunk of one generation carries the same prediction id"
    assert generate["final_is_last"], "the message with finish_reason must be the last one"
    assert generate["finish_reason"] in {"length", "stop"}
    assert generate["text"]
    usage = generate["usage"]
    assert usage["input_tokens"] > 0
    assert 0 < usage["output_tokens"] <= 16
    assert usage["time_to_first_token_ms"] > 0
    assert usage["total_time_ms"] >= usage["time_to_first_token_ms"]


def test_node_wrong_key_is_unauthenticated(node_result: dict[str, Any]) -> None:
    wrong = node_result["wrong_key"]
    assert wrong["code"] == UNAUTHENTICATED, wrong
    assert wrong["details"], "the error must say why"
