"""Next-token sampling on the device, with no host syncs: greedy, temperature, top-k, top-p, min-p.

Randomness is a counter-based hash of (seed, sample index, output position, token id), turned into
an exponential variate E per vocabulary entry; the sampled token is argmax(p / E) (the Gumbel-max
trick), which draws from p exactly. A draw therefore depends only on the request's own seed and
position, never on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64


# a step's per-row sampling parameters as the host gathers them by slot: name -> (dtype, the value of
# the padding rows' slot: greedy, no filtering); `position` is computed per step
ROW_PARAMS: dict[str, tuple[type, float]] = {
    "top_k": (np.int64, 0),
    "seed": (np.int64, 0),
    "sample_index": (np.int64, 0),
    "temperature": (np.float32, 0.0),
    "top_p": (np.float32, 1.0),
    "min_p": (np.float32, 0.0),
}
PER_SEQUENCE = ("seed", "sample_index")  # read off the sequence (a sample's own seed), not its params


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters, on the logits' device. Rows with temperature 0 are greedy."""

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1.0 = off
    min_p: torch.Tensor  # [B] float32, 0.0 = off
    seed: torch.Tensor  # [B] int64
    sample_index: torch.Tensor  # [B] int64
    position: torch.Tensor  # [B] int64: index of the token being drawn among the generated ones
    all_greedy: bool  # decided on the host: skip the random path entirely
    want_logprobs: bool

    @classmethod
    def from_step(
        cls, v: Mapping[str, torch.Tensor], all_greedy: bool, want_logprobs: bool
    ) -> SamplingTensors:
        """The tensors of a step's unpacked inputs `v`, which name them as these fields."""
        return cls(**{name: v[name] for name in _TENSORS}, all_greedy=all_greedy, want_logprobs=want_logprobs)


_TENSORS = tuple(f.name for f in fields(SamplingTensors) if f.name not in ("all_greedy", "want_logprobs"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values in [0, 2**32), held in int64)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def uniform(seed: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor, token_ids: torch.Tensor):
    """Uniform numbers in (0, 1), one per (row, token). seed/sample_index/position: [B]; token_ids: [B, K]."""
    key = _mix32(seed & _M32 ^ _mix32((seed >> 32) & _M32 ^ _mix32(sample_index ^ _mix32(position & _M32))))
    bits = _mix32(key[:, None] ^ _mix32(token_ids))  # [B, K]
    return unit_interval(bits >> 8)


def unit_interval(k: torch.Tensor) -> torch.Tensor:
    """Integers k in [0, 2**24) -> float32 (k + 0.5) / 2**24, strictly inside (0, 1).

    The top value, 1 - 2**-25, rounds to 1.0 in float32, whose variate -log(1.0) = 0 would turn a
    forbidden token's 0 / 0 into NaN, which argmax takes as the largest: it is clamped to the float32
    just below 1."""
    return ((k.float() + 0.5) * (1.0 / (1 << 24))).clamp_max(1.0 - 2.0**-24)


def filtered_probs(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, top-p and min-p, sorted descending.

    logits: [B, V] fp32 -> (probs [B, V] with excluded entries 0, token ids [B, V]).
    """
    temp = torch.where(st.temperature > 0, st.temperature, 1.0)
    sorted_logits, ids = torch.sort(logits / temp[:, None], dim=-1, descending=True)  # [B, V]
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    k = torch.where(st.top_k > 0, st.top_k, logits.shape[1])
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each entry
    drop = (before > st.top_p[:, None]) & (st.top_p[:, None] < 1.0)
    drop |= probs < st.min_p[:, None] * probs[:, :1]
    return probs.masked_fill(drop, 0.0), ids


def sample(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one token per row. logits: [B, V] (model dtype or fp32) -> (tokens [B] int64, logprobs [B]
    fp32 or None).

    Logprobs are those of the model's raw distribution (before temperature and filtering). A greedy
    step takes the argmax of the logits as they are (the same index as their fp32 copy's); the rest
    computes in fp32.
    """
    tokens = logits.argmax(-1)  # [B]
    if st.all_greedy and not st.want_logprobs:
        return tokens, None
    logits = logits.float()
    if not st.all_greedy:
        probs, ids = filtered_probs(logits, st)
        exp = -torch.log(uniform(st.seed, st.sample_index, st.position, ids))  # [B, V] Exp(1) variates
        choice = (probs / exp).argmax(-1, keepdim=True)  # [B, 1]
        tokens = torch.where(st.temperature > 0, ids.gather(1, choice)[:, 0], tokens)
    logprobs = None
    if st.want_logprobs:
        logprobs = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits with the tokens a grammar forbids at -inf. logits: [B, V]; bitmask: [B, W] int32,
    bit t % 32 of word t // 32 set = token t allowed (columns past W * 32 are forbidden)."""
    vocab = logits.shape[1]
    cols = torch.arange(vocab, device=logits.device)  # [V]
    words = bitmask[:, (cols // 32).clamp_max(bitmask.shape[1] - 1)]  # [B, V]
    allowed = ((words >> (cols % 32)) & 1).bool() & (cols < bitmask.shape[1] * 32)
    return logits.masked_fill(~allowed, float("-inf"))
