"""Random ragged paged batches, and the check of the Triton kernel against the reference on them.

Run as a module (`TRITON_INTERPRET=1 python -m tests.engine.layers.attention.triton_cases`) the checks
execute in
Triton's interpreter on the CPU: the interpreter must be chosen before Triton is first imported,
which the test suite has already done by then, so test_attention.py starts this in a subprocess.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from runner.engine.layers.attention.torch import (
    AttentionBatch,
    decode_order,
    prefill_blocks,
    reference_attention,
    to_cache,
)

# (seed, decodes, [(q_len, kv_len) of each prefill chunk], page size, heads, kv heads, head dim
#  [, sliding window, soft cap])
CASES = [
    (0, 5, [], 4, 6, 2, 16),
    (1, 0, [(7, 7)], 4, 6, 2, 16),
    (2, 3, [(5, 13), (9, 9), (1, 6)], 4, 6, 2, 16),
    (3, 1, [(40, 70)], 4, 6, 2, 16),
    (4, 0, [(17, 17), (33, 50)], 4, 4, 4, 32),
    (5, 2, [(20, 37)], 16, 8, 2, 64),
    (6, 3, [(18, 18)], 16, 8, 2, 80),  # head dim padded to 128 inside the kernel
    # the sweep's page sizes (scripts/sweep_config.py): many decodes on pages of 8; pages of 64 under
    # a 300-token prefill (several key blocks, several query blocks); the 8B shape's GQA (32/8 x 128)
    (7, 20, [(33, 120)], 8, 8, 2, 16),
    (8, 6, [(70, 300)], 64, 8, 2, 32),
    (9, 4, [(20, 90)], 64, 32, 8, 128),
    # sliding windows (Gemma 2/3, Phi-3) smaller than the sequences, over several key blocks, and
    # attention-logit soft-capping (Gemma 2)
    (10, 6, [(5, 13), (40, 150)], 4, 6, 2, 16, 7, 0.0),
    (11, 4, [(70, 300)], 16, 8, 2, 32, 100, 0.0),
    (12, 5, [(33, 120)], 8, 8, 4, 16, 0, 1.5),
    (13, 3, [(40, 200), (1, 9)], 8, 4, 2, 32, 64, 2.0),
    # decodes x KV heads in paged_attention.SMALL_DECODE_LAUNCH (the interpreter counts one SM): the
    # 1-warp tile of 32 keys at head dim 32 (also cases 0, 8, 10, 11), the tile of 128 keys at head dim 96
    (14, 5, [(9, 40)], 16, 8, 2, 96),
]

# split-KV decodes (`decode_attention`): (seed, decodes, longest decode, page size, heads, kv heads, head
# dim, sliding window, soft cap, splits). Decodes of 1..600 keys over 3 or 8 splits of whole 64-key
# blocks: some splits get no key (a short sequence), others a partial block; a window that starts past
# some splits; 33 splits, past the merge's power of two.
SPLIT_CASES = [
    (20, 6, 600, 16, 8, 2, 64, 0, 0.0, 3),
    (21, 5, 600, 8, 6, 2, 16, 0, 0.0, 8),
    (22, 4, 500, 16, 8, 2, 32, 100, 0.0, 8),
    (23, 3, 400, 4, 4, 2, 32, 0, 1.5, 3),
    (24, 2, 300, 64, 32, 8, 128, 0, 0.0, 33),
]


def random_batch(
    seed: int,
    num_decodes: int,
    prefills: list[tuple[int, int]],
    page: int = 4,
    heads: int = 6,
    kv_heads: int = 2,
    dim: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    longest_decode: int = 30,
):
    """Caches filled with random K/V, pages shuffled; prefills are (q_len, kv_len) pairs; decodes have
    1..`longest_decode` keys."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_pages = max(128, num_decodes * -(-longest_decode // page) + 32)
    k_cache = torch.randn(num_pages, page, kv_heads, dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_pages, page, kv_heads, dim, generator=g).to(device, dtype)
    shapes = [(1, rng.randint(1, longest_decode)) for _ in range(num_decodes)] + prefills
    free = list(range(num_pages))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-kv // page))] for _, kv in shapes]
    width = max(map(len, tables)) + 1
    row_slot = list(range(len(shapes) + 1))  # a slot per sequence and a spare, in shuffled order
    rng.shuffle(row_slot)
    rows = [[0] * width for _ in row_slot]
    for slot, pages in zip(row_slot, tables, strict=False):
        rows[slot][: len(pages)] = pages
    q_lens = np.array([s[0] for s in shapes])
    kv_lens = np.array([s[1] for s in shapes])
    cu = np.concatenate(([0], np.cumsum(q_lens)))
    block_seq, block_start = prefill_blocks(q_lens[num_decodes:], kv_lens[num_decodes:], num_decodes)

    def t(values) -> torch.Tensor:
        return torch.tensor(np.asarray(values), dtype=torch.int64, device=device)

    batch = AttentionBatch(
        cu_seqlens_q=t(cu),
        kv_lens=t(kv_lens),
        page_table=t(rows),
        row_slot=t(row_slot[: len(shapes)]),
        slot_mapping=t(np.zeros(cu[-1])),
        num_decodes=num_decodes,
        decode_seq=t(decode_order(kv_lens[:num_decodes])),
        block_seq=t(block_seq),
        block_start=t(block_start),
    )
    q = torch.randn(int(cu[-1]), heads, dim, generator=g).to(device, dtype)
    return q, k_cache, v_cache, batch


def to_cpu(batch: AttentionBatch) -> AttentionBatch:
    fields = (getattr(batch, name) for name in AttentionBatch.__slots__)
    return AttentionBatch(*(f.cpu() if isinstance(f, torch.Tensor) else f for f in fields))


def relative_error(
    case, device: str, dtype: torch.dtype, kv_dtype: torch.dtype | None = None, longest_decode: int = 30
) -> float:
    """‖kernel − reference‖ / ‖reference‖ on one case (the reference in fp32 on the CPU). `kv_dtype`: the
    cache's dtype when it is not `dtype` (fp8: the reference reads the same rounded K/V, upcast)."""
    from runner.engine.layers.attention.triton import paged_attention

    seed, nd, prefills, page, heads, kv_heads, dim, *masking = case
    window, softcap = masking or (0, 0.0)
    q, k_cache, v_cache, batch = random_batch(
        seed, nd, prefills, page, heads, kv_heads, dim, device, dtype, longest_decode
    )
    if kv_dtype is not None:
        k_cache, v_cache = to_cache(k_cache, kv_dtype), to_cache(v_cache, kv_dtype)
    scale = dim**-0.5
    ref = reference_attention(
        q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), to_cpu(batch), scale, window, softcap
    )
    out = paged_attention(q, k_cache, v_cache, batch, scale, window, softcap).cpu().float()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def split_relative_error(case, device: str, dtype: torch.dtype) -> float:
    """`relative_error` of a SPLIT_CASES case: decodes only, keys split over the case's `splits`."""
    from runner.engine.layers.attention.triton import decode_attention

    seed, nd, longest, page, heads, kv_heads, dim, window, softcap, splits = case
    q, k_cache, v_cache, batch = random_batch(
        seed, nd, [], page, heads, kv_heads, dim, device, dtype, longest
    )
    scale = dim**-0.5
    ref = reference_attention(
        q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), to_cpu(batch), scale, window, softcap
    )
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, out, batch, scale, window, softcap, splits)
    out = out.cpu().float()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def written_into_out() -> bool:
    """Whether a launch given `out` (a piece graph's static buffer) writes the result there and returns
    it: case 8, decodes and a prefill, into a buffer of NaNs."""
    from runner.engine.layers.attention.triton import paged_attention

    q, k_cache, v_cache, batch = random_batch(8, 6, [(70, 300)], 64, 8, 2, 32, "cpu", torch.float32)
    expected = paged_attention(q, k_cache, v_cache, batch, 32**-0.5)
    out = torch.full_like(q, float("nan"))
    returned = paged_attention(q, k_cache, v_cache, batch, 32**-0.5, 0, 0.0, out)
    return returned is out and torch.equal(out, expected)


def main() -> None:
    assert written_into_out()
    print("out: written in place")
    for case in CASES:
        err = relative_error(case, "cpu", torch.float32)
        print(f"case {case[0]}: relative error {err:.2e}")
        assert err < 1e-5, case
    for case in SPLIT_CASES:
        err = split_relative_error(case, "cpu", torch.float32)
        print(f"split case {case[0]}: relative error {err:.2e}")
        assert err < 1e-5, case


if __name__ == "__main__":
    main()
