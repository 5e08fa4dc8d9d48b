"""OpenAI Batch API request lines to prompts: the chat messages (through the chat template) or the
completion prompt, sampled as the request's body says over the job's sampling defaults.

A request that cannot run becomes an error row naming the line and the field. Body fields that change
nothing here are counted and reported once (`report`), never used.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from dataclasses import replace
from typing import Any, Literal

from runner.engine.sample.grammar import GrammarError, check_grammar
from runner.engine.types import SamplingParams
from runner.openai.batch import BatchRequest, RequestError, parse_request
from runner.prompts import PromptBuilder, PromptConfig, RowError, row_seed

log = logging.getLogger(__name__)

ModelMismatch = Literal["ignore", "error"]


class BatchRequestBuilder(PromptBuilder):
    """A `PromptBuilder` over request lines (input.format: openai-batch)."""

    limits_per_row = True  # a request's max_tokens may be anything its prompt leaves room for

    def __init__(
        self,
        spec: PromptConfig,
        sampling: SamplingParams,
        tokenizer,
        max_model_len: int,
        model_path: str,
        model_mismatch: ModelMismatch,
    ):
        """`model_path`: the job's model.path; a request's body.model other than it (or its last path
        component) is an error row under `model_mismatch: error`, a warning once under `ignore`."""
        super().__init__(spec, sampling, tokenizer, max_model_len)
        self.model_path = model_path
        self.model_names = {model_path, posixpath.basename(model_path.rstrip("/"))}
        self.model_mismatch = model_mismatch
        self.ignored: Counter[str] = Counter()  # body field -> requests that set it
        self._warned_mismatch = False

    def report(self) -> list[str]:
        """One line per ignored field, with how many requests of this task set it."""
        return [
            f"{field}: set by {count} request(s), not used by batchrun (ignored)"
            for field, count in sorted(self.ignored.items())
        ]

    def _prepare(self, shard: str, row: int, values: dict[str, Any]) -> tuple[str, SamplingParams, bool]:
        try:
            request = parse_request(values)
        except RequestError as e:
            raise RowError(str(e)) from None
        self._check_model(request)
        for field in request.ignored:
            if field not in self.ignored:
                log.warning("%s is not used by batchrun and is ignored (counted in the job's log)", field)
            self.ignored[field] += 1
        sampling = self._request_sampling(shard, row, request)
        if request.endpoint == "chat":
            return self._chat(request.messages), sampling, False
        return request.prompt, sampling, True

    def _check_model(self, request: BatchRequest) -> None:
        if request.model is None or request.model in self.model_names:
            return
        what = f"body.model {request.model!r} is not this job's model {self.model_path!r}"
        if self.model_mismatch == "error":
            raise RowError(f"{what} (input.model_mismatch: error)")
        if not self._warned_mismatch:
            self._warned_mismatch = True
            log.warning("%s: the responses echo the request's model (input.model_mismatch: ignore)", what)

    def _request_sampling(self, shard: str, row: int, request: BatchRequest) -> SamplingParams:
        params = replace(self.base_sampling, seed=row_seed(self.seed, shard, row))
        over = request.overrides
        if "json_schema" in over:  # the request's structured output replaces the job's
            try:
                check_grammar(("json_schema", over["json_schema"]))
            except GrammarError as e:
                raise RowError(f"body.response_format: {e}") from None
            params = replace(params, regex=None, choice=())
        params = replace(params, **over)
        if params.max_new_tokens >= self.max_model_len:
            given = "max_new_tokens" in over
            what = "body.max_tokens" if given else "sampling.max_new_tokens (the request sets no max_tokens)"
            raise RowError(
                f"{what} {params.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{self.max_model_len} tokens"
            )
        return params

    def _limit(self, sampling: SamplingParams) -> int:
        limit = self.max_model_len - sampling.max_new_tokens
        return limit if self.spec.max_tokens is None else min(limit, self.spec.max_tokens)
