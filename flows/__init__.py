"""Prefect flows (nouns): `rewrite` (the whole DAG) and `simulate-shard` (one range of simulation
shards, the unit of GPU fan-out)."""
