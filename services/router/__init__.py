"""The router: resolves public model names to deployed Triton models and calls Triton."""
