"""Turns a scheduled batch into device tensors, runs the forward and the sampler, returns the tokens.

This is the only place that touches the device in the step path; the asynchronous loop and CUDA
graphs (the next step of the engine) replace `run` here without touching the scheduler.
"""

from __future__ import annotations

import torch

from runner.engine.attention import AttentionBatch, AttentionFn
from runner.engine.model import PagedLlama
from runner.engine.sampling import SamplingTensors, sample
from runner.engine.scheduler import ScheduledBatch


class ModelRunner:
    """Holds the model and the KV cache tensor [layers, 2, pages, page_size, Hkv, D]."""

    def __init__(self, model: PagedLlama, num_pages: int, page_size: int, attention: AttentionFn) -> None:
        s = model.shape
        self.model = model
        self.page_size = page_size
        self.attention = attention
        self.kv_cache = torch.zeros(
            (s.num_layers, 2, num_pages, page_size, s.num_kv_heads, s.head_dim),
            device=model.device,
            dtype=model.dtype,
        )

    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[float] | None]:
        """Forward `batch`, sample for its `sample_rows`; returns the tokens (and logprobs) on the host."""
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        kv_lens: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start = seq.num_computed
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            slots += [seq.pages[p // ps] * ps + p % ps for p in range(start, start + n)]
            kv_lens.append(start + n)
        cu = [0]
        for n in batch.num_new:
            cu.append(cu[-1] + n)
        width = max(len(seq.pages) for seq in batch.seqs)
        table = [seq.pages + [0] * (width - len(seq.pages)) for seq in batch.seqs]
        rows = [batch.seqs[r] for r in batch.sample_rows]
        logits_rows = [cu[r + 1] - 1 for r in batch.sample_rows]

        dev = self.model.device

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        attn = AttentionBatch(
            cu_seqlens_q=t(cu, torch.int32),
            kv_lens=t(kv_lens, torch.int32),
            page_table=t(table, torch.int32),
            slot_mapping=t(slots, torch.int64),
            q_lens_host=batch.num_new,
            kv_lens_host=kv_lens,
            num_decodes=batch.num_decodes,
        )
        logits = self.model.forward(
            t(ids, torch.int64),
            t(positions, torch.int64),
            self.kv_cache,
            attn,
            t(logits_rows, torch.int64),
            self.attention,
        )  # [S, V]
        params = [s.params for s in rows]
        st = SamplingTensors(
            temperature=t([p.temperature for p in params], torch.float32),
            top_k=t([p.top_k for p in params], torch.int64),
            top_p=t([p.top_p for p in params], torch.float32),
            min_p=t([p.min_p for p in params], torch.float32),
            seed=t([s.seed for s in rows], torch.int64),
            sample_index=t([s.sample_index for s in rows], torch.int64),
            position=t([s.num_generated for s in rows], torch.int64),
            all_greedy=all(p.greedy for p in params),
            want_logprobs=any(p.logprobs for p in params),
        )
        tokens, logprobs = sample(logits, st)
        return tokens.tolist(), None if logprobs is None else logprobs.tolist()
