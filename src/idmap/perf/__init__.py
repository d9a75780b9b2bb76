"""Measuring speed, never part of a run: the throughput benchmark (bench.py), idmap-plan's estimate
(plan.py), the fused probe (fused.py) and the GPU check (gpu_check*.py). The product imports
nothing from here (tests/test_architecture.py)."""
