"""Throughput benchmark: DESIGN.md's workloads through batchrun and transformers' generate_batch.

Random-weight Llama-shaped bf16 models, greedy, no EOS, every request generates exactly `new`
tokens; prompt lengths uniform in [64, 768] (W3: all 128; L1: in [15360, 16384]), token ids uniform,
seed 0. All backends run in the same process on the same model. Prints one table and writes JSON (with
the command line). Each run's `roofline` is t_min / wall (`t_min`: decode steps at their bytes alone, as if
attention ran beside the matmuls) and its `serial` t_serial / wall (`t_serial`: the kernels one after the
other, as the engine runs them), both from the copy and matmul rates measured at the start.

    python scripts/bench.py --workloads W0 --backends batchrun,hf-sync,hf-async --out results.json
    python scripts/bench.py --workloads W2,W3 --backends batchrun,batchrun-fp8   # bf16 vs fp8 weights
    python scripts/bench.py --workloads W2,W3 --backends batchrun,batchrun-fp8,batchrun-fp8kv   # + fp8 KV
    python scripts/bench.py --workloads W70 --backends batchrun   # Llama-3.1-70B shape, fp8, one GPU
    python scripts/bench.py --workloads W1 --backends batchrun,batchrun-json --temperature 0,1   # JSON schema
    python scripts/bench.py --workloads W2 --backends batchrun-tp1,batchrun-tp2   # tensor parallel, 2 GPUs
    python scripts/bench.py --workloads W70B --backends batchrun-tp2   # Llama-3.1-70B shape, bf16, 2 GPUs
    python scripts/bench.py --workloads L1 --backends batchrun,hf-sync   # 16 prompts of 15-16k tokens

`batchrun-json` runs the engine with every request under `JSON_SCHEMA` (structured output), whose
free-text field cannot close before `new` tokens, so rows run to the end under the grammar: compare it
with `batchrun` (same model, same prompts) and read `wait ms/step` (the engine's host wait per step)
and `grammar_ms_per_step` (host time filling bitmasks and advancing matchers). The grammar needs a
tokenizer of the model's vocabulary: a synthetic byte-level one (`synthetic_tokenizer`).
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner` imports


@dataclass(slots=True, frozen=True)
class Workload:
    hidden: int
    inter: int  # MLP intermediate size; an MoE's is each expert's
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    prompts: int
    new: int
    experts: int = 0  # 0: a dense Llama; else a Qwen3-MoE with `top_k` of `experts` per token
    top_k: int = 0
    prompt_len: tuple[int, int] = (64, 768)  # prompt lengths uniform in [lo, hi]
    fp8_only: bool = False  # built on the meta device, fp8 weights filled layer by layer (no bf16 copy)
    family: str = "llama"  # llama | gemma2 | phi3: the transformers config class (dense only)
    positions: int = 4096  # max_position_embeddings


WORKLOADS = {
    "W0": Workload(576, 1536, 30, 9, 3, 64, 49152, True, 512, 256),
    "W1": Workload(2048, 8192, 16, 32, 8, 64, 128256, True, 512, 256),
    "W2": Workload(4096, 14336, 32, 32, 8, 128, 128256, False, 256, 128),
    "W3": Workload(4096, 14336, 32, 32, 8, 128, 128256, False, 4096, 128, prompt_len=(128, 128)),
    "W70": Workload(8192, 28672, 80, 64, 8, 128, 128256, False, 256, 128, fp8_only=True),  # llama-3.1-70b
    "M1": Workload(2048, 768, 48, 32, 4, 128, 151936, False, 256, 128, experts=128, top_k=8),  # qwen3-30b-a3b
    "G2": Workload(2304, 9216, 26, 8, 4, 256, 256000, True, 512, 256, family="gemma2"),  # gemma-2-2b
    "P3": Workload(3072, 8192, 32, 32, 32, 96, 32064, False, 512, 256, family="phi3"),  # phi-3-mini
    # llama-3.1-70b in bf16: 140 GB, tensor parallel only (batchrun-tp2 and up)
    "W70B": Workload(8192, 28672, 80, 64, 8, 128, 128256, False, 256, 128),
    # long prompts (documents to summarize): W1's model, 16 prompts of 15-16k tokens; decode attention
    # reads 8 GB a step from 16 x 8 (sequence, KV head) pairs
    "L1": Workload(
        2048, 8192, 16, 32, 8, 64, 128256, True, 16, 256, prompt_len=(15360, 16384), positions=32768
    ),
}


@dataclass(slots=True, frozen=True)
class Rates:
    """What this GPU does at best, measured in the same process as the benchmark (`measure_rates`)."""

    bf16_flops: float  # dense bf16 matmul, FLOP/s
    fp8_flops: float  # torch._scaled_mm with row-wise scales, FLOP/s
    bytes_per_s: float  # device memory bandwidth (a large copy: bytes read + written), B/s


def measure_rates(repeats: int = 20) -> Rates:
    """Time a 8192^3 bf16 matmul, the same as an fp8 `_scaled_mm`, and a 4 GiB device-to-device copy."""

    def rate(fn, work: float) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return work * repeats / (start.elapsed_time(end) / 1e3)

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = rate(lambda: a @ b, 2 * n**3)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    fp8 = rate(lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), 2 * n**3)
    src = torch.empty(2**29, device="cuda", dtype=torch.int64)  # 4 GiB
    dst = torch.empty_like(src)
    bandwidth = rate(lambda: dst.copy_(src), 2 * src.numel() * 8)
    return Rates(bf16_flops=bf16, fp8_flops=fp8, bytes_per_s=bandwidth)


@dataclass(slots=True)
class Result:
    workload: str
    backend: str
    generated_tokens: int
    wall_s: float
    tok_s: float
    gpu_busy_pct: float | None
    roofline_fraction: float
    t_min_s: float
    serial_fraction: float  # of t_serial: the best of kernels one after the other
    t_serial_s: float
    peak_mem_gib: float
    temperature: float = 0.0  # 0: greedy; else seeded top-p 0.95 sampling
    stats: dict | None = None


def workload_config(name: str, positions: int = 4096):
    """The transformers config of a workload's model."""
    from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen3MoeConfig

    w = WORKLOADS[name]
    common = dict(
        hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads, head_dim=w.head_dim, vocab_size=w.vocab, tie_word_embeddings=w.tied,
        max_position_embeddings=positions, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    if w.experts:
        return Qwen3MoeConfig(
            **common, intermediate_size=6144, moe_intermediate_size=w.inter, num_experts=w.experts,
            num_experts_per_tok=w.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    if w.family == "gemma2":  # Gemma 2's sliding window (4096), soft-capping and scalings as released
        return Gemma2Config(
            **common, intermediate_size=w.inter, sliding_window=4096, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=w.head_dim,
        )  # fmt: skip
    if w.family == "phi3":
        return Phi3Config(**common, intermediate_size=w.inter)
    return LlamaConfig(**common, intermediate_size=w.inter)


def build_model(name: str, device: str = "cuda", positions: int = 4096):
    """The workload's random-weight model, built in bf16 directly on `device` (M1's 30B parameters would
    not fit twice, in fp32 first)."""
    from transformers import AutoModelForCausalLM

    config = workload_config(name, positions)
    if WORKLOADS[name].fp8_only:
        return build_fp8_model(config, torch.device(device))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.no_grad()
def pooled_model(name: str, positions: int = 4096):
    """The workload's model on the CPU for tensor-parallel runs, every matrix a view of one random bf16
    pool (std 0.02) the size of the largest, norms 1: each rank builds it in seconds and in little
    host memory (a 70B model costs its embedding), and copies only its slice to its GPU. Speed does
    not depend on the values."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from runner.engine.loading.loader import rebuild_buffers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(workload_config(name, positions), dtype=torch.bfloat16)
    largest = max(p.numel() for p in model.parameters())
    pool = torch.randn(largest, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16).mul_(0.02)
    for module in model.modules():
        for leaf, p in list(module.named_parameters(recurse=False)):
            value = torch.ones(p.shape, dtype=p.dtype) if p.dim() == 1 else pool[: p.numel()].view(p.shape)
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    rebuild_buffers(model, torch.device("cpu"))
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.no_grad()
def build_fp8_model(config, device: torch.device):
    """A random model whose bf16 weights would not fit the GPU (W70: 140 GB): built on the meta device,
    then each decoder linear gets random fp8 weights + per-channel scales straight on `device` (the form
    a stored fp8 checkpoint loads into, see runner/engine/loading/loader.py), one matrix at a time;
    embeddings, LM head and norms in bf16."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from runner.engine.layers.fp8.torch import quantize_weight
    from runner.engine.loading.loader import rebuild_buffers

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, module in model.named_modules():
        for leaf, p in list(module.named_parameters(recurse=False)):
            if isinstance(module, nn.Linear) and ".layers." in name:
                rand = torch.randn(p.shape, device=device, dtype=torch.bfloat16).mul_(0.02)
                wq, module.weight_scale = quantize_weight(rand)
                module.weight = nn.Parameter(wq, requires_grad=False)
            elif p.dim() == 1:  # norms
                module._parameters[leaf] = nn.Parameter(torch.ones(p.shape, device=device, dtype=p.dtype))
            else:  # embeddings, LM head
                t = torch.randn(p.shape, device=device, dtype=p.dtype).mul_(0.02)
                module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    rebuild_buffers(model, device)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_prompts(name: str, num: int | None) -> list[list[int]]:
    w = WORKLOADS[name]
    rng = random.Random(0)
    lengths = [rng.randint(*w.prompt_len) for _ in range(num or w.prompts)]
    return [[rng.randrange(w.vocab) for _ in range(n)] for n in lengths]


def experts_touched(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a layer reads in a step of `batch` tokens, each picking `top_k` of
    `experts` uniformly: E (1 - (1 - k/E)^B)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


@dataclass(slots=True, frozen=True)
class StepCosts:
    """What a workload's matmuls and decode steps cost, as the roofline counts them."""

    active: float  # decoder parameters a token's matmuls use (an MoE's: attention, router, its top_k experts)
    weight_bytes: float  # weights a decode step reads: the decoder's, the embeddings and the LM head
    kv_bytes_per_token: float  # K and V of one token, every layer


def step_costs(name: str, batch: int, fp8: bool = False, fp8_kv: bool = False) -> StepCosts:
    """`name`'s costs at decode steps of `batch` rows (an MoE step reads the experts `batch` tokens touch,
    `experts_touched`). fp8: the decoder's weights are 1 byte each (the router too, < 0.1%; embeddings and LM
    head stay bf16); fp8_kv: the KV cache is 1 byte a value."""
    w = WORKLOADS[name]
    attention = w.hidden * (w.heads + 2 * w.kv_heads) * w.head_dim + w.heads * w.head_dim * w.hidden
    expert = 3 * w.hidden * w.inter
    embeddings = w.vocab * w.hidden * (1 if w.tied else 2)
    if w.experts:
        active = attention + w.experts * w.hidden + w.top_k * expert
        read = attention + w.experts * w.hidden + experts_touched(w.experts, w.top_k, batch) * expert
    else:
        active = read = attention + expert
    return StepCosts(
        active=active,
        weight_bytes=(1 if fp8 else 2) * w.layers * read + 2 * embeddings,
        kv_bytes_per_token=w.layers * 2 * w.kv_heads * w.head_dim * (1 if fp8_kv else 2),
    )


def t_min(
    name: str, prompts: list[list[int]], new: int, rates: Rates, fp8: bool = False, fp8_kv: bool = False
) -> float:
    """Roofline time: prefill FLOPs of the active parameters at the measured matmul rate + every decode step's
    weight and live-KV bytes. All prompts decode together (batch B = prompts); `step_costs` says what a step
    reads, and what fp8 and fp8_kv change (fp8: the GEMMs run at the fp8 rate)."""
    w, c = WORKLOADS[name], step_costs(name, len(prompts), fp8, fp8_kv)
    prompt_tokens = sum(len(p) for p in prompts)
    t = 2 * w.layers * c.active * prompt_tokens / (rates.fp8_flops if fp8 else rates.bf16_flops)
    for step in range(new):
        kv_bytes = (prompt_tokens + step * len(prompts)) * c.kv_bytes_per_token
        t += (c.weight_bytes + kv_bytes) / rates.bytes_per_s
    return t


def t_serial(
    name: str, prompts: list[list[int]], new: int, rates: Rates, fp8: bool = False, fp8_kv: bool = False
) -> float:
    """The best time of a step's kernels one after the other, each at the measured peak, as the engine runs
    them: `t_min` plus the causal prefill attention's FLOPs, and each decode step's matmuls (the LM head's
    included) at the larger of their FLOPs and their weight bytes, its KV bytes after them. t_min counts a
    decode step by its bytes alone, which asks the attention to run beside the matmuls; on the H200 they do
    not (scripts/bench_overlap.py, PERF_NOTES.md "attention beside the matmuls")."""
    w, c = WORKLOADS[name], step_costs(name, len(prompts), fp8, fp8_kv)
    matmul_rate = rates.fp8_flops if fp8 else rates.bf16_flops
    lengths = [len(p) for p in prompts]
    pairs = sum(n * (n + 1) // 2 for n in lengths)  # (query, visible key) pairs of every prompt's prefill
    prompt_tokens, batch = sum(lengths), len(prompts)
    t = 2 * w.layers * c.active * prompt_tokens / matmul_rate
    t += 4 * w.layers * w.heads * w.head_dim * pairs / rates.bf16_flops
    decoder_s = 2 * w.layers * c.active * batch / matmul_rate
    lm_head_s = 2 * w.vocab * w.hidden * batch / rates.bf16_flops
    step_matmuls = max(decoder_s + lm_head_s, c.weight_bytes / rates.bytes_per_s)  # a decode step's
    for step in range(new):
        t += step_matmuls + (prompt_tokens + step * batch) * c.kv_bytes_per_token / rates.bytes_per_s
    return t


# twice a second, as a job's monitor (runner/telemetry/monitor.py) polls: every 50 ms, the polls
# slowed W0 by 5-15 %
# (PERF_NOTES.md, "NVML polls")
BUSY_POLL_S = 0.5


class BusySampler:
    """Mean GPU utilisation (NVML, through torch) sampled every BUSY_POLL_S seconds in a thread."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(BUSY_POLL_S):
            self.samples.append(torch.cuda.utilization())

    def __enter__(self) -> BusySampler:
        try:
            torch.cuda.utilization()
        except Exception:  # no pynvml: report None
            self._stop.set()
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


JSON_SCHEMA = json.dumps({
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "text": {"type": "string"},  # free text: with `synthetic_tokenizer`, rows stay in it to the end
    },
    "required": ["label", "score", "text"],
})  # fmt: skip


def synthetic_tokenizer(vocab: int):
    """A byte-level BPE tokenizer of `vocab` tokens (no download): the 256 byte symbols, random printable
    strings of 2-8 characters, and an EOS last. The multi-character tokens hold no `"` or `\\`, so that
    the random model can close a JSON string only with the one-byte `"` token: rows stay in the free
    text (`rows_under_grammar` counts them) and every step is a constrained one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = pre_tokenizers.ByteLevel.alphabet()
    table = {s: i for i, s in enumerate(sorted(symbols))}
    printable = [c for c in symbols if c.isprintable() and c not in '"\\']
    rng = random.Random(0)
    while len(table) < vocab - 1:
        table.setdefault("".join(rng.choices(printable, k=rng.randint(2, 8))), len(table))
    table["<|eos|>"] = vocab - 1
    core = Tokenizer(models.BPE(vocab=table, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>")


def tensor_parallel(backend: str) -> int:
    """N of a `-tpN` backend, 0 for the others."""
    return next((int(p[2:]) for p in backend.split("-") if p.startswith("tp")), 0)


def run_batchrun(
    name: str,
    model,
    prompts: list[list[int]],
    new: int,
    backend: str,
    engine: dict,
    temperature: float,
    source,
) -> tuple[int, dict]:
    """`backend`: batchrun[-fp8|-fp8kv][-json][-sync][-tpN] (fp8: weights quantized at load; fp8kv: that
    and an fp8 KV cache; json: every request under `JSON_SCHEMA`; sync: async_mode off; tpN: N GPUs,
    tensor parallel, each rank building `pooled_model` from `source`, N = 1 included, instead of using
    `model`)."""
    from runner.engine import Engine, EngineConfig, Request, SamplingParams

    parts = backend.split("-")[1:]
    ranks = tensor_parallel(backend)
    assert set(parts) - {f"tp{ranks}"} <= {"fp8", "fp8kv", "json", "sync"}, backend
    schema = JSON_SCHEMA if "json" in parts else None
    vocab = WORKLOADS[name].vocab
    tokenizer = synthetic_tokenizer(vocab) if schema else None
    config = EngineConfig(
        device="cuda", dtype="bfloat16", async_mode="sync" not in parts,
        quantization="fp8" if {"fp8", "fp8kv"} & set(parts) else "none",
        kv_cache_dtype="fp8" if "fp8kv" in parts else "auto", tensor_parallel=max(ranks, 1), **engine,
    )  # fmt: skip
    if ranks > 1:
        engine = Engine.from_source(source, config, tokenizer=tokenizer)
    else:
        engine = Engine(source.factory() if ranks else model, config, tokenizer=tokenizer)
    sp = SamplingParams(
        max_new_tokens=new, ignore_eos=True, temperature=temperature, top_p=0.95, seed=0, json_schema=schema
    )
    warm = SamplingParams(max_new_tokens=4, ignore_eos=True, json_schema=schema)
    # no prefix of a measured prompt; 64 prompts fill a whole 16384-token step, so that the largest
    # prefill tiles (an MoE's 128-row expert blocks) compile here, not in the measured run
    shifted = [[(t + 1) % vocab for t in p] for p in prompts[:64]]
    list(engine.generate(Request(-i - 1, p, warm) for i, p in enumerate(shifted)))  # compile kernels
    # batches of short prompts too: an MoE's mid-size expert tiles compile here, not in the measured run
    for length in (4, 16):
        short = [[(t + length) % vocab for t in p[:length]] for p in prompts[8:56]]
        list(engine.generate(Request(-i - 100, p, warm) for i, p in enumerate(short)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = list(engine.generate(Request(i, p, sp) for i, p in enumerate(prompts)))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    stats = engine.stats()
    stats["measured_wall_s"] = round(wall, 3)  # without the engine build and warm-up
    stats["peak_mem_gib_with_kv_pool"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    stats["kv_used_peak_gib"] = round(stats["kv_pages_used_peak"] * stats["kv_page_bytes"] / 2**30, 2)
    stats["host_wait_ms_per_step"] = round(1e3 * stats["host_wait_s"] / stats["steps"], 3)  # warm-up included
    stats["grammar_ms_per_step"] = round(1e3 * stats["grammar_s"] / stats["steps"], 3)
    if schema:  # rows still inside the free-text field: {"label":"..","score":..,"text":"...
        stats["rows_under_grammar"] = sum(
            c.text.startswith('{"label":"') and c.text.count('"') == 9 for c in done
        )
    engine.close()  # KV pool, graphs and their pool, buffers: the next backend gets the memory back
    return sum(len(c.token_ids) for c in done), stats


def run_hf(model, prompts: list[list[int]], new: int, async_mode: bool) -> tuple[int, dict | None]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(use_async_batching=async_mode)
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    return sum(len(o.generated_tokens) for o in out.values()), None


def bench(
    name: str,
    backend: str,
    model,
    prompts: list[list[int]],
    new: int,
    engine: dict,
    rates: Rates,
    temperature: float = 0.0,
    positions: int = 4096,
) -> Result:
    ranks = max(tensor_parallel(backend), 1)
    if backend.startswith("batchrun"):
        from runner.engine.loading.source import ModelSource

        source = ModelSource(factory=functools.partial(pooled_model, name, positions))
        run = lambda: run_batchrun(name, model, prompts, new, backend, engine, temperature, source)
    else:
        run = {
            "hf-sync": lambda: run_hf(model, prompts, new, False),
            "hf-async": lambda: run_hf(model, prompts, new, True),
        }[backend]
    fp8 = "fp8" in backend or WORKLOADS[name].fp8_only
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with BusySampler() as busy:
        generated, stats = run()
    wall = time.perf_counter() - t0
    fp8_kv = "fp8kv" in backend.split("-")
    floor = t_min(name, prompts, new, rates, fp8, fp8_kv) / ranks  # N GPUs: N times the bandwidth and FLOP/s
    serial = t_serial(name, prompts, new, rates, fp8, fp8_kv) / ranks
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    gc.collect()  # the backend's objects (engine, transformers' manager and cache) are gone now
    torch.cuda.empty_cache()
    if stats is not None:  # batchrun: time the generation alone (engine build and warm-up excluded)
        wall = stats["measured_wall_s"]
    return Result(
        workload=name, backend=backend, generated_tokens=generated, wall_s=round(wall, 3),
        tok_s=round(generated / wall, 1), gpu_busy_pct=busy.mean,
        roofline_fraction=round(floor / wall, 4), t_min_s=round(floor, 3),
        serial_fraction=round(serial / wall, 4), t_serial_s=round(serial, 3),
        peak_mem_gib=peak_gib, temperature=temperature, stats=stats,
    )  # fmt: skip


def compared_with(backend: str) -> list[str]:
    """The backends whose tok/s a run is divided by in the summary: fp8 KV (with fp8 weights) by fp8
    weights alone and by bf16; fp8 weights by bf16; structured output by free output."""
    parts = backend.split("-")
    if "json" in parts:
        return ["-".join(p for p in parts if p != "json")]
    if "fp8kv" in parts:
        return [
            "-".join("fp8" if p == "fp8kv" else p for p in parts),
            "-".join(p for p in parts if p != "fp8kv"),
        ]
    if "fp8" in parts:
        return ["-".join(p for p in parts if p != "fp8")]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W0")
    ap.add_argument(
        "--backends", default="batchrun,hf-sync,hf-async",
        help="batchrun[-fp8|-fp8kv][-json][-sync][-tpN] (fp8: weights quantized at load; fp8kv: that and an "
        "fp8 KV cache; json: every request under a JSON schema; sync: async off; tpN: tensor parallel over N "
        "GPUs, roofline counts N GPUs), hf-sync, hf-async",
    )  # fmt: skip
    ap.add_argument("--prompts", type=int, default=None, help="override the workload's prompt count")
    ap.add_argument("--new", type=int, default=None, help="override the workload's new tokens")
    ap.add_argument("--max-seqs", type=int, default=None, help="engine.max_seqs (default: EngineConfig's)")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine.max_batch_tokens")
    ap.add_argument("--page-size", type=int, default=None, help="engine.page_size")
    ap.add_argument(
        "--temperature", default="0",
        help="comma list, each backend runs at each (0: greedy; > 0: seeded top-p 0.95 sampling, as jobs do)",
    )  # fmt: skip
    ap.add_argument(
        "--positions",
        type=int,
        default=None,
        help="max_position_embeddings (default: the workload's; Llama 3.1: 131072)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    engine = {k: v for k, v in (("max_seqs", args.max_seqs), ("max_batch_tokens", args.max_batch_tokens),
              ("page_size", args.page_size)) if v is not None}  # fmt: skip
    rates = measure_rates()
    print(
        f"measured: bf16 matmul {rates.bf16_flops / 1e12:.0f} TFLOP/s, "
        f"fp8 {rates.fp8_flops / 1e12:.0f} TFLOP/s, memory {rates.bytes_per_s / 1e12:.2f} TB/s",
        flush=True,
    )
    results = []
    for name in args.workloads.split(","):
        backends = args.backends.split(",")
        in_process = any(not tensor_parallel(b) for b in backends)  # the -tpN backends build their own
        positions = args.positions or WORKLOADS[name].positions
        model = build_model(name, positions=positions) if in_process else None
        prompts = make_prompts(name, args.prompts)
        new = args.new or WORKLOADS[name].new
        for temperature, backend in itertools.product(map(float, args.temperature.split(",")), backends):
            if WORKLOADS[name].fp8_only and not backend.startswith("batchrun"):
                print(f"{name}: {backend} skipped (its bf16 weights would not fit; only batchrun runs fp8)")
                continue
            r = bench(name, backend, model, prompts, new, engine, rates, temperature, positions)
            print(json.dumps(asdict(r)), flush=True)
            results.append(r)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    best_hf: dict[str, float] = {}
    for r in results:
        if r.backend.startswith("hf"):
            best_hf[r.workload] = max(best_hf.get(r.workload, 0.0), r.tok_s)
    cols = ("temp", "tok/s", "wall s", "busy %", "roofline", "serial", "vs hf", "wait ms/step")
    print(f"\n{'workload':8} {'backend':14} " + " ".join(f"{c:>9}" for c in cols))
    for r in results:
        speedup = f"{r.tok_s / best_hf[r.workload]:.2f}x" if r.workload in best_hf else "-"
        wait = f"{r.stats['host_wait_ms_per_step']:.2f}" if r.stats else "-"
        print(
            f"{r.workload:8} {r.backend:14} {r.temperature:9.2g} {r.tok_s:9.0f} {r.wall_s:9.2f} "
            f"{r.gpu_busy_pct or 0:9.1f} {r.roofline_fraction:9.3f} {r.serial_fraction:9.3f} {speedup:>9} "
            f"{wait:>12}"
        )
    by_key = {(r.workload, r.temperature, r.backend): r.tok_s for r in results}
    for (workload, temperature, backend), tok_s in by_key.items():
        for base in compared_with(backend):
            if (workload, temperature, base) in by_key:
                ratio = tok_s / by_key[workload, temperature, base]
                print(f"{workload} at temperature {temperature:g}: {backend} / {base} = {ratio:.2f}x")
    if args.out:
        device = torch.cuda.get_device_name()
        doc = {"command": " ".join(sys.argv), "device": device, "torch": torch.__version__,
               "rates": asdict(rates), "results": [asdict(r) for r in results]}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
