"""Attention over the paged KV cache: torch.py (the interface, the KV store, the reference), cpu.py
(the batched CPU path) and triton.py (the CUDA kernel)."""
