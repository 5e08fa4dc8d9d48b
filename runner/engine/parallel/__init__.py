"""Tensor parallelism: group.py (the ranks' processes), weight_split.py (a rank's slice of each tensor)
and layers.py (TensorParallel, row-parallel sums, the vocabulary split)."""
