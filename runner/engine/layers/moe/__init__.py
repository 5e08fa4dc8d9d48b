"""Mixture of experts: torch.py (routing, SparseMoE, the experts in torch) and triton.py (the fused-MoE
kernels)."""
