"""The mixture-of-experts families: `PagedLlama` with its MLP replaced by `layers.moe`'s `SparseMoE`."""
