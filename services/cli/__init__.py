"""The `mlmesh` command line."""
