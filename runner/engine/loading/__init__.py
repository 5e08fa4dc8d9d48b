"""Checkpoints into memory: loader.py (safetensors), hf_config.py, skeleton.py, quantization.py and
source.py (where each rank gets its model)."""
