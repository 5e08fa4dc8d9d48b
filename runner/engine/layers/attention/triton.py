"""Triton paged attention over the ragged batch (CUDA; the tests also run it in Triton's interpreter).

One kernel, two launches per layer: decodes (one query per sequence, grid [Bd, Hkv, splits]) and prefill
chunks (blocks of BLOCK_Q queries, grid [blocks, Hkv]), program -> sequence mapped on the host, the
programs with the most keys first (`attention.decode_order`, `attention.prefill_blocks`). An SM runs all
its share of a launch of short decode programs at once, so programs of unequal lengths leave SMs idle
while one finishes its long sequences: W0's launch (`seqs_per_program`) runs the i-th longest and the
i-th shortest decode in program i, pairs of about equal reads. A decode
launch of few sequences splits each sequence's keys over `splits` programs (split-KV, as flash-decoding):
without it, a batch of 16 long sequences would run 16 x Hkv programs on 132 SMs. Each split writes its
partial output and log-sum-exp to a workspace, and a second kernel merges them; the split count depends
on the row count, not the lengths (`decode_splits`), so a decode graph's launch has one fixed shape. A
program takes the GROUP query heads that share one KV head, so K/V pages are read once per GROUP
(GQA packing: M = queries x GROUP rows feed the tensor cores). K/V are gathered token by token
through the page table, BLOCK_N tokens per iteration, with an online softmax in fp32; a prefill block
runs first over the keys that all its queries see, without the causal mask (+38% on a 16k-token 8B
prompt, scripts/results/attention-*.json), then over the rest with it. A sliding
window starts the key loop at the block's first visible key (pages that left the window are never
read); soft-capping applies softcap * tanh(logit / softcap) to the scaled logits. An fp8 KV cache
(`kv_cache_dtype: fp8`, scale 1.0) is read as such, half the bytes, and each tile is upcast in registers
(exact: every e4m3 value is an fp16 / fp32 value); the dots accumulate in fp32. Under bf16 queries the
dots then run in fp16 (`HALF_DOT`): e4m3 -> fp16 is one instruction per pair on sm89+, e4m3 -> bf16
several (13-15% of a decode launch on the H200; an fp8 cache is still read slower than a bf16 one,
runner/engine/README.md). q [M, D] converts once per program (bf16 -> fp16 is exact inside fp16's
range; the rare |q| > 65504 is clamped), and the probabilities p in [0, 1] keep more bits in fp16
than in bf16.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from runner.engine.layers.attention.torch import PREFILL_BLOCK_Q, AttentionBatch
from runner.engine.layers.fp8.format import FP8

BLOCK_N = 64  # keys per iteration
# software-pipeline stages of the key loop: 3 for a prefill launch of head dim <= 64 (W0's 16k-token step
# +17%, a 16k-token 1B prompt +23%), else 2 (3 cost head dim 128 2-3%): scripts/sweep_attention_tiles.py
PREFILL_STAGES_SMALL_HEADS = 3
DECODE_PROGRAMS_PER_SM = 4  # a decode launch of fewer programs than this x SMs splits its keys up to it
# an unsplit decode launch of 8 to 16 programs per SM (W0: 512 rows x 3 KV heads, 11.6 on 132 SMs; W2:
# 256 x 8, 15.5) runs pairs of decodes in 2-warp programs of 64 keys at head dim <= 64 (W0's launch 69.8
# -> 57.9 µs against one decode a program), 128 keys an iteration at head dim 65-128 (W2's -7-9 %); fewer
# programs (64 long sequences x 8 KV heads: +13-22 %) or more (W1's 31 per SM: +3-6 %) keep the default
# tile (scripts/sweep_attention_tiles.py --kind decode, scripts/results/attention-decode-pairs-sweep.*)
SMALL_DECODE_LAUNCH = (8, 16)
# shared memory per SM that the 128-key tile needs (2 stages of K and V at head dim 128: 128 KiB, and the
# rest): an H100 / H200 has 228 KiB, an sm89 GPU 100 KiB (which keeps the default tile)
WIDE_DECODE_SMEM = 160 * 1024
MAX_SPLITS = 32


@triton.jit
def _attend(
    acc, l_i, m_i,  # [M, D_PAD], [M], [M] fp32: the online softmax so far
    q,  # [M, D_PAD]
    q_pos,  # [M] each row's query position
    k_ptr, v_ptr, table_row, kv_head, lo, hi, scale, window, stride_kp, stride_ks, stride_kh,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOWED: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key in [lo, hi) is visible to every row (no causal mask)
):  # fmt: skip
    """Fold keys [lo, hi) (lo a multiple of BLOCK_N) into the online softmax; returns acc, l_i, m_i."""
    LOG2E: tl.constexpr = 1.4426950408889634  # softmax in base 2
    d = tl.arange(0, D_PAD)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        if MASKED:
            page = tl.load(table_row + n // PAGE, mask=n_ok, other=0)
        else:
            page = tl.load(table_row + n // PAGE)
        kv_off = page.to(tl.int64) * stride_kp + (n % PAGE) * stride_ks + kv_head * stride_kh
        k_at = k_ptr + kv_off[:, None] + d[None, :]  # [N, D_PAD]
        v_at = v_ptr + kv_off[:, None] + d[None, :]
        if MASKED or D != D_PAD:
            kv_mask = n_ok[:, None] & (d < D)[None, :]
            k = tl.load(k_at, mask=kv_mask, other=0.0).to(q.dtype)  # [N, D_PAD]
            v = tl.load(v_at, mask=kv_mask, other=0.0).to(q.dtype)
        else:
            k = tl.load(k_at).to(q.dtype)
            v = tl.load(v_at).to(q.dtype)
        if IEEE:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP > 0:  # tanh(x) = 2 sigmoid(2x) - 1
            s = SOFTCAP * (2.0 * tl.sigmoid(s * (scale * 2.0 / SOFTCAP)) - 1.0) * LOG2E
        else:
            s = s * (scale * LOG2E)
        if MASKED:
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            if WINDOWED:  # each row sees the last `window` keys up to its own position
                visible = visible & (n[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))  # [M, N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:  # noqa: SIM108
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_sequence(
    seq, q_first,  # the batch row, and its first query this program attends (0 for a decode)
    kv_head, split, q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, slot_ptr, cu_ptr, kv_len_ptr, part_ptr, lse_ptr,
    num_splits, scale, window,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_ot, stride_oh, stride_table,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DECODE: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOWED: tl.constexpr, HALF_DOT: tl.constexpr,
):  # fmt: skip
    """One program's work on one sequence: the BLOCK_Q queries from q_first (the GROUP heads of `kv_head`)
    over their visible keys (a SPLIT decode: this split's share), stored to o (SPLIT: to the workspace)."""
    q_begin = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_begin
    kv_len = tl.load(kv_len_ptr + seq)
    table_row = table_ptr + tl.load(slot_ptr + seq) * stride_table

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP  # query within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = kv_len - q_len + q_idx  # absolute position of each row's query
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(
        q_ptr + (q_begin + q_idx)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, D]
    if HALF_DOT:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    kv_end = tl.minimum(kv_len, kv_len - q_len + q_first + BLOCK_Q)  # past the block's last query
    kv_start = 0
    if WINDOWED:  # keys before the block's first query's window are invisible to the whole block
        kv_start = tl.maximum(kv_len - q_len + q_first - window + 1, 0) // BLOCK_N * BLOCK_N
    if SPLIT:  # this split's share of the visible keys, whole key blocks of them
        share = tl.cdiv(tl.cdiv(kv_end - kv_start, num_splits), BLOCK_N) * BLOCK_N
        kv_start = kv_start + split * share
        kv_end = tl.minimum(kv_end, kv_start + share)
    masked_from = kv_start
    if not DECODE and not WINDOWED:  # the block's keys up to its first query are visible to all its rows
        first_pos = kv_len - q_len + q_first
        masked_from = tl.minimum(tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, kv_start), kv_end)
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_row, kv_head, kv_start, masked_from, scale, window,
            stride_kp, stride_ks, stride_kh, BLOCK_N, PAGE, D, D_PAD, IEEE, SOFTCAP, WINDOWED, False,
        )  # fmt: skip
    # a decode has one loop (compiled alone): it is bound by its reads, and a second loop costs W1's 15%
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_row, kv_head, masked_from, kv_end, scale, window,
        stride_kp, stride_ks, stride_kh, BLOCK_N, PAGE, D, D_PAD, IEEE, SOFTCAP, WINDOWED, True,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:  # row `seq` of the decodes is token `seq`; the merge writes o
        part = (seq * (tl.num_programs(1) * GROUP) + head) * num_splits + split  # [M]
        tl.store(part_ptr + part[:, None] * D_PAD + d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=row_ok)
    else:
        tl.store(
            o_ptr + (q_begin + q_idx)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


# Triton compiles one variant per specialization of its integer arguments (== 1, divisible by 16) and
# of its pointers' 16-byte alignment: the window size and the grid array's length are not specialized,
# and the step's packed inputs are laid out 16-byte aligned (runner/engine/worker/inputs.py).
@triton.jit(do_not_specialize=["window", "num_seqs"])
def _paged_attention_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [P, PAGE, Hkv, D]: q's dtype, or fp8 (upcast on load)
    v_ptr,
    o_ptr,  # [T, H, D]
    table_ptr,  # [S, W] pages of each slot's sequence
    slot_ptr,  # [B] each sequence's slot (row of the table)
    cu_ptr,  # [B + 1] query offsets
    kv_len_ptr,  # [B]
    grid_seq_ptr,  # [num_seqs] the grid array: each prefill block's sequence, or the decodes longest first
    blk_start_ptr,  # [num_seqs] first query (within its sequence) of each prefill block (unused for decodes)
    num_seqs,
    part_ptr,  # SPLIT: [Bd, H, splits, D_PAD] fp32, each split's normalized output
    lse_ptr,  # SPLIT: [Bd, H, splits] fp32, each split's log2-sum-exp2 of its logits (-inf: no keys)
    num_splits,
    scale,
    window,  # 0: full attention
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_ot, stride_oh, stride_table,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DECODE: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr,  # decode only: this program covers split program_id(2) of the keys
    SOFTCAP: tl.constexpr,  # 0.0: none
    WINDOWED: tl.constexpr,  # window > 0 (compiled out of full-attention layers)
    HALF_DOT: tl.constexpr,  # an fp8 cache under bf16 queries: the dots run in fp16
    SEQS: tl.constexpr,  # grid entries a program runs: 1, or 2 (decodes: entry pid, then its mirror)
):  # fmt: skip
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)  # 0 but in a SPLIT launch
    for j in tl.static_range(SEQS):  # SEQS 2: the pid-th longest decode, then the pid-th shortest
        entry = pid + j * (num_seqs - 1 - 2 * pid)
        if entry >= pid + j:  # an odd count's middle entry is its own mirror: run once
            if DECODE:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
                q_first = 0
            else:
                q_first = tl.load(blk_start_ptr + entry)
            _attend_sequence(
                tl.load(grid_seq_ptr + entry), q_first, kv_head, split, q_ptr, k_ptr, v_ptr, o_ptr, table_ptr,
                slot_ptr, cu_ptr, kv_len_ptr, part_ptr, lse_ptr, num_splits, scale, window,
                stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_ot, stride_oh, stride_table,
                GROUP, BLOCK_Q, BLOCK_M, BLOCK_N, PAGE, D, D_PAD, DECODE, IEEE, SPLIT, SOFTCAP, WINDOWED,
                HALF_DOT,
            )  # fmt: skip


@triton.jit
def _merge_splits_kernel(
    part_ptr,  # [Bd, H, splits, D_PAD] fp32
    lse_ptr,  # [Bd, H, splits] fp32
    o_ptr,  # [T, H, D]
    num_splits, stride_ot, stride_oh,
    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """o[seq, head] = the splits' outputs weighted by their share of the softmax: grid [Bd, H]."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))  # [SPLITS_PAD]
    top = tl.max(lse, 0)
    weight = tl.where(lse > float("-inf"), tl.math.exp2(lse - top), 0.0)
    part = tl.load(
        part_ptr + (row * num_splits + s)[:, None] * D_PAD + d[None, :],
        mask=(s < num_splits)[:, None],
        other=0.0,
    )  # [SPLITS_PAD, D_PAD]
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + seq * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SMs; one stands for Triton's interpreter on the CPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.cache
def smem_per_sm(device: torch.device) -> int:
    """The device's shared memory per SM in bytes; Triton's interpreter on the CPU has no such limit."""
    if device.type != "cuda":
        return WIDE_DECODE_SMEM
    return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor


def decode_splits(rows: int, kv_heads: int, sms: int) -> int:
    """How many programs a decode launch of `rows` sequences gives each (sequence, KV head): as many as
    DECODE_PROGRAMS_PER_SM programs on each of `sms` SMs take, at most MAX_SPLITS (rounded down: a
    second, partial wave of programs would cost as much as the first)."""
    return min(MAX_SPLITS, max(1, DECODE_PROGRAMS_PER_SM * sms // (rows * kv_heads)))


def half_dot(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Whether the dots run in fp16: an fp8 cache read by bf16 queries."""
    return kv_dtype == FP8 and q_dtype == torch.bfloat16


Tile = tuple[int, int, int, int]  # queries per program, keys per iteration, warps, pipeline stages


def _small_decode_launch(programs_per_sm: float, splits: int) -> bool:
    """An unsplit decode launch of SMALL_DECODE_LAUNCH programs per SM."""
    lo, hi = SMALL_DECODE_LAUNCH
    return splits == 1 and lo <= programs_per_sm < hi


def kernel_tile(
    decode: bool, dim: int, programs_per_sm: float = 0.0, splits: int = 1, smem: int = WIDE_DECODE_SMEM
) -> Tile:
    """The tile a decode or prefill launch of head dim `dim` takes (scripts/sweep_attention_tiles.py); a
    decode launch's also depends on its programs per SM, its splits (`SMALL_DECODE_LAUNCH`) and the
    device's shared memory per SM (`smem`, bytes)."""
    if not decode:
        return PREFILL_BLOCK_Q, BLOCK_N, 4, PREFILL_STAGES_SMALL_HEADS if dim <= 64 else 2
    if seqs_per_program(decode, dim, programs_per_sm, splits) == 2:  # the tile a pair of decodes needs
        return 1, 64, 2, 2
    if _small_decode_launch(programs_per_sm, splits) and dim <= 128 and smem >= WIDE_DECODE_SMEM:
        return 1, 128, 4, 2
    return 1, BLOCK_N, 4, 2


def seqs_per_program(decode: bool, dim: int, programs_per_sm: float, splits: int) -> int:
    """Sequences each program of a launch runs: a pair of decodes (the i-th longest and the i-th shortest:
    programs of about equal reads) in an unsplit decode launch of SMALL_DECODE_LAUNCH programs per SM at
    head dim <= 64 (W0's), else one. W2's launch in pairs took 123.1 µs at best against 127.2 and W1's
    154.2 against 150.4 (one decode a program, longest first): they keep one."""
    return 2 if decode and dim <= 64 and _small_decode_launch(programs_per_sm, splits) else 1


def launch(
    q, k_cache, v_cache, out, batch: AttentionBatch, scale, window, softcap, grid: int, decode: bool,
    splits: int = 1, tile: Tile | None = None, fp16_dots: bool | None = None,
) -> None:  # fmt: skip
    """The kernel over `grid` programs per KV head (the decodes, or the prefill blocks of `batch`), and the
    merge of its `splits`. `tile` (default `kernel_tile`) and `fp16_dots` (default `half_dot`) set
    otherwise only by scripts/sweep_attention_tiles.py."""
    programs_per_sm = grid * k_cache.shape[2] * splits / sm_count(q.device)
    block_q, block_n, warps, stages = tile or kernel_tile(
        decode, q.shape[2], programs_per_sm, splits, smem_per_sm(q.device)
    )
    group = q.shape[1] // k_cache.shape[2]
    dim = q.shape[2]
    d_pad = max(16, triton.next_power_of_2(dim))
    part = lse = out  # unused without splits
    if splits > 1:
        part = torch.empty(grid, q.shape[1], splits, d_pad, device=q.device, dtype=torch.float32)
        lse = torch.empty(grid, q.shape[1], splits, device=q.device, dtype=torch.float32)
    seqs = seqs_per_program(decode, q.shape[2], programs_per_sm, splits)
    _paged_attention_kernel[(triton.cdiv(grid, seqs), k_cache.shape[2], splits)](
        q, k_cache, v_cache, out, batch.page_table, batch.row_slot, batch.cu_seqlens_q, batch.kv_lens,
        batch.decode_seq if decode else batch.block_seq, batch.block_start, grid, part, lse, splits, scale,
        window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), batch.page_table.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=max(16, triton.next_power_of_2(block_q * group)),
        BLOCK_N=block_n, PAGE=k_cache.shape[1], D=dim, D_PAD=d_pad, DECODE=decode,
        IEEE=q.dtype == torch.float32, SPLIT=splits > 1, SOFTCAP=float(softcap), WINDOWED=window > 0,
        HALF_DOT=half_dot(q.dtype, k_cache.dtype) if fp16_dots is None else fp16_dots,
        SEQS=seqs, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(grid, q.shape[1])](
            part, lse, out, splits, out.stride(0), out.stride(1),
            D=dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(splits),
        )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int,
    softcap: float,
    splits: int,
) -> None:
    """The decodes' rows of `out` [T, H, D]: each (sequence, KV head)'s visible keys split over `splits`
    programs (1: no split, no merge)."""
    launch(q, k_cache, v_cache, out, batch, scale, window, softcap, batch.num_decodes, True, splits)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query over its sequence's cached K/V (the last `window` positions when > 0,
    logits soft-capped when `softcap` > 0). q: [T, H, D] -> [T, H, D], written into `out` when given (a
    piece graph's static buffer, `worker/piece_graphs.py`)."""
    assert k_cache.stride(3) == 1 and q.stride(2) == 1
    out = torch.empty_like(q) if out is None else out
    if batch.num_decodes:
        splits = decode_splits(batch.num_decodes, k_cache.shape[2], sm_count(q.device))
        decode_attention(q, k_cache, v_cache, out, batch, scale, window, softcap, splits)
    if batch.block_seq.numel():
        launch(q, k_cache, v_cache, out, batch, scale, window, softcap, batch.block_seq.numel(), decode=False)
    return out
