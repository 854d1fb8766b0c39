"""Shared kit for every mlmesh service: settings, server bootstrap, errors, telemetry, stubs."""
