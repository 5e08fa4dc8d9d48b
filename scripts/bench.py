"""Throughput benchmark: DESIGN.md's workloads through batchrun and transformers' generate_batch.

Random-weight Llama-shaped bf16 models, greedy, no EOS, every request generates exactly `new`
tokens; prompt lengths uniform in [64, 768], token ids uniform, seed 0. All backends run in the
same process on the same model. Prints one table and writes JSON (with the command line).

    python scripts/bench.py --workloads W0 --backends batchrun,hf-sync,hf-async --out results.json

`batchrun-json` runs the engine with every request under `JSON_SCHEMA` (structured output), whose
free-text field cannot close before `new` tokens, so rows run to the end under the grammar: compare it
with `batchrun` (same model, same prompts) and read `wait ms/step` (the engine's host wait per step)
and `grammar_ms_per_step` (host time filling bitmasks and advancing matchers). The grammar needs a
tokenizer of the model's vocabulary: a synthetic byte-level one (`synthetic_tokenizer`).
"""

from __future__ import annotations

import argparse
import gc
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


WORKLOADS = {
    "W0": Workload(576, 1536, 30, 9, 3, 64, 49152, True, 512, 256),
    "W1": Workload(2048, 8192, 16, 32, 8, 64, 128256, True, 512, 256),
    "W2": Workload(4096, 14336, 32, 32, 8, 128, 128256, False, 256, 128),
    "M1": Workload(2048, 768, 48, 32, 4, 128, 151936, False, 256, 128, experts=128, top_k=8),  # qwen3-30b-a3b
}
FLOPS, BYTES_PER_S = 790e12, 3.0e12  # H100 bf16 matmul rate and memory bandwidth, measured (DEVICE_NOTES.md)


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
    peak_mem_gib: float
    stats: dict | None = None


def build_model(name: str, device: str = "cuda", positions: int = 4096):
    """The workload's random-weight model, built in bf16 directly on `device` (M1's 30B parameters would
    not fit twice, in fp32 first)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    w = WORKLOADS[name]
    common = dict(
        hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads, head_dim=w.head_dim, vocab_size=w.vocab, tie_word_embeddings=w.tied,
        max_position_embeddings=positions, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    if w.experts:
        config = Qwen3MoeConfig(
            **common, intermediate_size=6144, moe_intermediate_size=w.inter, num_experts=w.experts,
            num_experts_per_tok=w.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    else:
        config = LlamaConfig(**common, intermediate_size=w.inter)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_prompts(name: str, num: int | None) -> list[list[int]]:
    w = WORKLOADS[name]
    rng = random.Random(0)
    return [[rng.randrange(w.vocab) for _ in range(rng.randint(64, 768))] for _ in range(num or w.prompts)]


def experts_touched(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a layer reads in a step of `batch` tokens, each picking `top_k` of
    `experts` uniformly: E (1 - (1 - k/E)^B)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


def t_min(name: str, prompts: list[list[int]], new: int) -> float:
    """Roofline time: prefill FLOPs of the active parameters at the matmul rate + every decode step's
    weight and live-KV bytes. All prompts decode together (batch B = prompts); an MoE step reads the
    attention weights, the router and the experts touched by B tokens (`experts_touched`)."""
    w = WORKLOADS[name]
    attention = w.hidden * (w.heads + 2 * w.kv_heads) * w.head_dim + w.heads * w.head_dim * w.hidden
    expert = 3 * w.hidden * w.inter
    embeddings = w.vocab * w.hidden * (1 if w.tied else 2)
    if w.experts:
        active = attention + w.experts * w.hidden + w.top_k * expert
        read = attention + w.experts * w.hidden + experts_touched(w.experts, w.top_k, len(prompts)) * expert
    else:
        active = read = attention + expert
    weight_bytes = 2 * (w.layers * read + embeddings)
    kv_bytes_per_token = w.layers * 2 * w.kv_heads * w.head_dim * 2
    prompt_tokens = sum(len(p) for p in prompts)
    t = 2 * w.layers * active * prompt_tokens / FLOPS
    for step in range(new):
        t += (weight_bytes + (prompt_tokens + step * len(prompts)) * kv_bytes_per_token) / BYTES_PER_S
    return t


class BusySampler:
    """Mean GPU utilisation (NVML, through torch) sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
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


def run_batchrun(
    model, prompts: list[list[int]], new: int, async_mode: bool, engine: dict, temperature: float,
    schema: str | None = None,
) -> tuple[int, dict]:  # fmt: skip
    from runner.engine import Engine, EngineConfig, Request, SamplingParams

    tokenizer = synthetic_tokenizer(model.config.vocab_size) if schema else None
    config = EngineConfig(device="cuda", dtype="bfloat16", async_mode=async_mode, **engine)
    engine = Engine(model, config, tokenizer=tokenizer)
    sp = SamplingParams(
        max_new_tokens=new, ignore_eos=True, temperature=temperature, top_p=0.95, seed=0, json_schema=schema
    )
    warm = SamplingParams(max_new_tokens=4, ignore_eos=True, json_schema=schema)
    vocab = model.config.vocab_size
    shifted = [[(t + 1) % vocab for t in p] for p in prompts[:8]]  # no prefix of a measured prompt
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
    name: str, backend: str, model, prompts: list[list[int]], new: int, engine: dict, temperature: float = 0.0
) -> Result:
    run = {
        "batchrun": lambda: run_batchrun(model, prompts, new, True, engine, temperature),
        "batchrun-sync": lambda: run_batchrun(model, prompts, new, False, engine, temperature),
        "batchrun-json": lambda: run_batchrun(model, prompts, new, True, engine, temperature, JSON_SCHEMA),
        "hf-sync": lambda: run_hf(model, prompts, new, False),
        "hf-async": lambda: run_hf(model, prompts, new, True),
    }[backend]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with BusySampler() as busy:
        generated, stats = run()
    wall = time.perf_counter() - t0
    floor = t_min(name, prompts, new)
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    gc.collect()  # the backend's objects (engine, transformers' manager and cache) are gone now
    torch.cuda.empty_cache()
    if stats is not None:  # batchrun: time the generation alone (engine build and warm-up excluded)
        wall = stats["measured_wall_s"]
    return Result(
        workload=name, backend=backend, generated_tokens=generated, wall_s=round(wall, 3),
        tok_s=round(generated / wall, 1), gpu_busy_pct=busy.mean,
        roofline_fraction=round(floor / wall, 4), t_min_s=round(floor, 3),
        peak_mem_gib=peak_gib, stats=stats,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W0")
    ap.add_argument("--backends", default="batchrun,hf-sync,hf-async")
    ap.add_argument("--prompts", type=int, default=None, help="override the workload's prompt count")
    ap.add_argument("--new", type=int, default=None, help="override the workload's new tokens")
    ap.add_argument("--max-seqs", type=int, default=None, help="engine.max_seqs (default: EngineConfig's)")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine.max_batch_tokens")
    ap.add_argument("--page-size", type=int, default=None, help="engine.page_size")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: seeded top-p sampling, as jobs do")
    ap.add_argument("--positions", type=int, default=4096, help="max_position_embeddings (Llama 3.1: 131072)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    engine = {k: v for k, v in (("max_seqs", args.max_seqs), ("max_batch_tokens", args.max_batch_tokens),
              ("page_size", args.page_size)) if v is not None}  # fmt: skip
    results = []
    for name in args.workloads.split(","):
        model = build_model(name, positions=args.positions)
        prompts = make_prompts(name, args.prompts)
        new = args.new or WORKLOADS[name].new
        for backend in args.backends.split(","):
            r = bench(name, backend, model, prompts, new, engine, args.temperature)
            print(json.dumps(asdict(r)), flush=True)
            results.append(r)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    best_hf: dict[str, float] = {}
    for r in results:
        if r.backend.startswith("hf"):
            best_hf[r.workload] = max(best_hf.get(r.workload, 0.0), r.tok_s)
    cols = ("tok/s", "wall s", "busy %", "roofline", "vs hf", "wait ms/step")
    print(f"\n{'workload':8} {'backend':14} " + " ".join(f"{c:>9}" for c in cols))
    for r in results:
        speedup = f"{r.tok_s / best_hf[r.workload]:.2f}x" if r.workload in best_hf else "-"
        wait = f"{r.stats['host_wait_ms_per_step']:.2f}" if r.stats else "-"
        print(
            f"{r.workload:8} {r.backend:14} {r.tok_s:9.0f} {r.wall_s:9.2f} {r.gpu_busy_pct or 0:9.1f} "
            f"{r.roofline_fraction:9.3f} {speedup:>9} {wait:>12}"
        )
    if args.out:
        device = torch.cuda.get_device_name()
        doc = {"command": " ".join(sys.argv), "device": device, "torch": torch.__version__,
               "results": [asdict(r) for r in results]}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
