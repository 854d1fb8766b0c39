"""The registry: model versions, artifacts, stages, promotion rules and rollouts."""
