"""Drift detection and A/B analysis for mlmesh (statistics core in :mod:`services.drift.statistics`)."""
