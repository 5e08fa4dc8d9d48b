"""OpenAI Batch API output lines: a request's completions as a ChatCompletion or Completion body.

    {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "req_...",
     "body": {...ChatCompletion or Completion, with usage...}}, "error": null}

A request that failed gets status 400 (the request could not run) or 500 (its generation failed), an
error body as OpenAI's API returns it, and `error: {code, message}`. Ids are derived from the row's
place in the input, so a resumed job writes the same ids.

Each output row stores the line as JSON text (`line`) beside the columns the commit protocol and
`batchrun status` read (`_shard`, `_row`, `finish_reason`, `error`, token counts); the final file and
the errors file hold the lines alone (`output_line`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.engine.types import Completion
from runner.openai.batch import URLS, custom_id_of
from runner.prompts import PreparedRow

LINE_COLUMN = "line"


def output_line(row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI output line of a stored output row."""
    return json.loads(row[LINE_COLUMN])


@dataclass(slots=True, frozen=True)
class BatchOutputRows:
    """Builds the output row of each request (one row, with all `n` choices)."""

    model: str  # the job's model.path: a response's model when the request names none
    token_text: Callable[[int], str]  # a token's text, for logprobs

    def error_rows(self, prep: PreparedRow, error: str) -> list[dict]:
        """The row of a request that could not run (status 400)."""
        return [self._row(prep, 400, error, len(prep.prompt_ids or ()), 0, None)]

    def sample_rows(
        self, prep: PreparedRow, samples: list[Completion], errors: list[str | None]
    ) -> list[dict]:
        """The row of a request whose samples finished; any sample's error fails the request (status 500)."""
        prompt_tokens = samples[0].prompt_tokens
        generated = sum(s.generated_tokens for s in samples)
        error = next((e for e in errors if e), None)
        if error:
            return [self._row(prep, 500, error, prompt_tokens, generated, None)]
        return [self._row(prep, 200, None, prompt_tokens, generated, self._body(prep, samples))]

    def _row(
        self, prep: PreparedRow, status: int, error: str | None, prompt_tokens: int, generated: int, body
    ) -> dict:
        key = _key(prep)
        if error is not None:
            kind = "invalid_request_error" if status == 400 else "server_error"
            body = {"error": {"message": error, "type": kind, "param": None, "code": None}}
        line = {
            "id": f"batch_req_{key}",
            "custom_id": custom_id_of(prep.values),
            "response": {"status_code": status, "request_id": f"req_{key}", "body": body},
            "error": None if error is None else {"code": body["error"]["type"], "message": error},
        }
        return {
            "_shard": prep.shard,
            "_row": prep.row,
            LINE_COLUMN: json.dumps(line, ensure_ascii=False),
            "finish_reason": "error" if error else "stop",
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated,
            "error": error,
        }

    def _body(self, prep: PreparedRow, samples: list[Completion]) -> dict:
        values = prep.values or {}
        chat = URLS[values["url"]] == "chat"
        key = _key(prep)
        prompt_tokens = samples[0].prompt_tokens
        completion_tokens = sum(s.generated_tokens for s in samples)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{key}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": values["body"].get("model") or self.model,
            "choices": [self._chat_choice(s) if chat else self._text_choice(s) for s in samples],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": None,
        }

    def _chat_choice(self, c: Completion) -> dict:
        logprobs = None
        if c.logprobs is not None:
            content = []
            for token_id, logprob in zip(c.token_ids, c.logprobs, strict=False):
                token = self.token_text(token_id)
                entry = {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode()),
                    "top_logprobs": [],
                }
                content.append(entry)
            logprobs = {"content": content, "refusal": None}
        message = {"role": "assistant", "content": c.text or "", "refusal": None}
        return {
            "index": c.sample_index,
            "message": message,
            "finish_reason": c.finish_reason,
            "logprobs": logprobs,
        }

    def _text_choice(self, c: Completion) -> dict:
        logprobs = None
        if c.logprobs is not None:
            tokens = [self.token_text(t) for t in c.token_ids[: len(c.logprobs)]]
            offsets, at = [], 0
            for token in tokens:
                offsets.append(at)
                at += len(token)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": c.logprobs,
                "top_logprobs": None,
                "text_offset": offsets,
            }
        return {
            "index": c.sample_index,
            "text": c.text or "",
            "finish_reason": c.finish_reason,
            "logprobs": logprobs,
        }


def _key(prep: PreparedRow) -> str:
    """The request's id part: from its place in the input, the same on every resume."""
    return hashlib.blake2b(f"{prep.shard}\0{prep.row}".encode(), digest_size=12).hexdigest()
