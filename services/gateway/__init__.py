"""The public entry of the mesh: auth, tenants, rate limits, validation, deadlines."""
