"""fp8 weights and activations: torch.py (Fp8Linear, the quantizers), triton.py (per-token activation
quantization) and format.py (the e4m3fn constants all of them share)."""
