"""Side-by-side benchmark of the mesh (gateway, router) against direct Triton and an MLServer peer."""
