"""`python -m services.registry`: the registry alone (configuration from MLMESH_REGISTRY_* variables)."""

from services.mesh import main

if __name__ == "__main__":
    main("registry")
