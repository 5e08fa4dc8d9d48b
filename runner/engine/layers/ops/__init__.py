"""The small ops between the matmuls: torch.py (TorchOps, and ops_for) and triton.py (their fused kernels)."""
