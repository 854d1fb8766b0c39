"""A model card per version, generated from what the registry knows (Markdown)."""

from __future__ import annotations

import json

from services.registry.store import VersionRecord


def _json_block(raw: str) -> str:
    try:
        return "```json\n" + json.dumps(json.loads(raw), indent=2, sort_keys=True) + "\n```"
    except (TypeError, ValueError):
        return raw


def model_card(record: VersionRecord) -> str:
    lineage = record.lineage
    lines = [
        f"# {record.model} — version {record.version}",
        "",
        record.description or "_No description given._",
        "",
        "| | |",
        "|---|---|",
        f"| Kind | {record.kind} |",
        f"| Stage | {record.stage} |",
        f"| Aliases | {', '.join(record.aliases) or '—'} |",
        f"| Registered | {record.created_at} by {record.created_by} |",
        f"| Artifact | sha256:{record.artifact_sha256} "
        f"({record.artifact_files} files, {record.artifact_bytes} bytes) |",
        f"| Deployed as | {record.triton_model or 'not deployed'} |",
        "",
        "## Lineage",
        "",
        f"- Dataset: {lineage.get('dataset_version') or 'unknown'}"
        + (f" (sha256 {lineage['dataset_sha256']})" if lineage.get("dataset_sha256") else ""),
        f"- Code commit: {lineage.get('code_commit') or 'unknown'}",
        f"- Derived from version: {lineage.get('parent_version') or '—'}",
    ]
    if lineage.get("training_config_json"):
        lines += ["", "### Training configuration", "", _json_block(lineage["training_config_json"])]
    lines += ["", "## Evaluation", ""]
    evaluation = lineage.get("evaluation_json")
    lines.append(_json_block(evaluation) if evaluation else "_No evaluation recorded._")
    lines += ["", "## Privacy", ""]
    if lineage.get("privacy_epsilon"):
        lines.append(
            f"Trained with differential privacy: ε = {lineage['privacy_epsilon']}, "
            f"δ = {lineage.get('privacy_delta', 0)}."
        )
    else:
        lines.append("No differential-privacy guarantee recorded.")
    if record.tags:
        lines += ["", "## Tags", ""] + [f"- {k}: {v}" for k, v in sorted(record.tags.items())]
    return "\n".join(lines) + "\n"
