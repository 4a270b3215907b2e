"""Prefect flows (nouns): `rewrite`, the whole DAG."""
