"""What a checkpoint's `quantization_config` says, checked against what the engine's fp8 path runs.

Read (config.json's `quantization_config`, as a dict):

- `compressed-tensors` (llm-compressor's FP8 / FP8-dynamic): float 8-bit weights with per-channel or
  per-tensor scales (`weight_scale`), format `float-quantized` / `naive-quantized`;
- `fbgemm_fp8` (Meta's FP8 Llama 3.1): fp8 weights with per-channel `weight_scale` [N, 1];
- `fp8` without `weight_block_size` (per-tensor `weight_scale`, optional static `input_scale`).

In every case the weights load as stored (fp8 + one scale per output channel, a per-tensor scale
broadcast) and activations are quantized per token at run time: static input scales, fbgemm's
`activation_scale_ub` and input-scale tensors are not used (per-token scales are at least as fine).
Anything else (int8/int4, block-wise or group-wise scales, fp8 KV-cache schemes) raises
`UnsupportedModel` with the reason, and the runner falls back to transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.engine.types import UnsupportedModel

STORED_FP8_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
# per-module tensors that belong to a stored fp8 weight but are not used (activations are dynamic)
UNUSED_SUFFIXES = (".input_scale", ".input_scale_ub", ".weight_zero_point", ".input_zero_point")


@dataclass(slots=True, frozen=True)
class CheckpointQuant:
    """How a checkpoint's linear weights are stored (read from its `quantization_config`)."""

    method: str  # compressed-tensors | fbgemm_fp8 | fp8
    weight_strategy: str  # "channel" | "tensor"


def read_quantization(config) -> CheckpointQuant | None:
    """The checkpoint's fp8 scheme from a transformers config (or config.json dict); None when unquantized.

    Raises UnsupportedModel for schemes the fp8 path does not run.
    """
    qc = (
        config.get("quantization_config")
        if isinstance(config, dict)
        else getattr(config, "quantization_config", None)
    )
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fbgemm_fp8":
        return CheckpointQuant("fbgemm_fp8", "channel")
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise UnsupportedModel(
                f"fp8 checkpoint with block-wise scales (weight_block_size={qc['weight_block_size']}); "
                "the fast path runs per-channel or per-tensor scales"
            )
        return CheckpointQuant("fp8", "tensor")
    raise UnsupportedModel(
        f"quantization_config.quant_method {method!r} (the fast path reads {', '.join(STORED_FP8_METHODS)})"
    )


def _compressed_tensors(qc: dict) -> CheckpointQuant:
    fmt = qc.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise UnsupportedModel(f"compressed-tensors format {fmt!r} (the fast path reads float-quantized)")
    if qc.get("kv_cache_scheme"):
        raise UnsupportedModel(
            "compressed-tensors kv_cache_scheme (the fast path does not read KV scales: its fp8 KV cache, "
            "engine.kv_cache_dtype, has scale 1.0)"
        )
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedModel("compressed-tensors quantization_config without config_groups")
    strategies = set()
    for name, group in groups.items():
        w = group.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise UnsupportedModel(
                f"compressed-tensors group {name!r}: weights {w.get('type')} {w.get('num_bits')}-bit "
                "(the fast path runs float 8-bit)"
            )
        if w.get("strategy") not in ("channel", "tensor"):
            raise UnsupportedModel(
                f"compressed-tensors group {name!r}: weight strategy {w.get('strategy')!r} "
                "(the fast path runs channel or tensor scales)"
            )
        a = group.get("input_activations")
        if a is not None and (a.get("type") != "float" or a.get("num_bits") != 8):
            raise UnsupportedModel(f"compressed-tensors group {name!r}: activations are not float 8-bit")
        strategies.add(w["strategy"])
    return CheckpointQuant("compressed-tensors", "channel" if "channel" in strategies else "tensor")
