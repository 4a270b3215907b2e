"""Prefect flows (nouns): `rewrite` (the whole DAG), `simulate-shard` (one range of simulation
shards, the unit of GPU fan-out) and `patch-evaluate` (calibrate -> evaluate -> report of a finished
run; also `rewrite`'s subflow for those stages)."""
