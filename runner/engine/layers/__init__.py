"""Building blocks shared by the model families in `runner/engine/models/`.

- `norm.py`: RMSNorm; `rope.py`: rotary tables and RoPE; `linear.py`: fused projections, gated MLP;
- `attention.py`: the attention interface over the paged KV cache, the KV store, the plain reference;
- `attention/triton.py`: the Triton paged-attention kernel (CUDA);
- `fused.py`: Triton kernels for the small ops between the matmuls (CUDA); `ops.py`: their torch
  twins (`TorchOps`, the CPU path and the kernels' oracle) and `ops_for(device)`, which picks one.
"""
