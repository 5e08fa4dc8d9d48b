"""Building blocks shared by the model families in `runner/engine/models/`; each kernel sits beside its
torch twin, the pair named so.

- `norm.py`: RMSNorm; `rope.py`: rotary tables and RoPE; `linear.py`: fused projections, gated MLP;
- `attention/`: `torch.py` the interface over the paged KV cache, the KV store and the plain reference;
  `cpu.py` the batched CPU path; `triton.py` the paged-attention kernel (CUDA);
- `ops/`: `torch.py` the small ops between the matmuls (`TorchOps`, the CPU path and the kernels'
  oracle) and `ops_for(device)`, which picks them or `triton.py`, their fused kernels (CUDA);
- `moe/`: `torch.py` routing and the experts, `triton.py` the fused-MoE kernels;
- `fp8/`: `torch.py` fp8 linears and quantizers, `triton.py` the activation quantizer, `format.py`.
"""
