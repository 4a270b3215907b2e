"""Thin Prefect tasks, one per stage: each calls the library and returns a small ArtifactRef."""
