"""The error budget: input errors judged over the rows read, generation errors over the rows generated."""

from __future__ import annotations

import pytest

from runner.errors.budget import ErrorBudget, ErrorBudgetExceeded


def budget(rows_total: int = 1000) -> ErrorBudget:
    return ErrorBudget(max_fraction=0.1, max_input_fraction=0.5, window=100, rows_total=rows_total)


def test_dirty_rows_finishing_first_do_not_stop_the_job():
    b = budget()
    for i in range(1000):  # 20% empty prompts: all read, and finished, long before any good row
        if i % 5 == 0:
            b.input_error("x.jsonl", f"x.jsonl line {i + 1}: empty prompt")
        else:
            b.sent()
    for _ in range(800):
        b.finished("x.jsonl", None)
    assert (b.input_errors, b.read, b.generated) == (200, 1000, 800)


def test_a_job_of_input_errors_stops_within_the_window():
    b = budget()
    with pytest.raises(ErrorBudgetExceeded, match=r"^stopped: 51 of the 51 rows read are input errors"):
        for i in range(1000):
            b.input_error("x.jsonl", f"x.jsonl line {i + 1}: row has no field 'text'")
    assert b.errors == 51  # the row that spent the budget is counted (and committed by the loop)


def test_a_short_job_of_errors_stops_before_its_last_row():
    b = budget(rows_total=4)
    with pytest.raises(ErrorBudgetExceeded):
        for i in range(4):
            b.input_error("x.jsonl", f"x.jsonl line {i + 1}: empty prompt")
    assert b.errors == 3


def test_generation_errors_are_judged_over_the_rows_generated():
    b = budget()
    for _ in range(300):
        b.sent()
    for _ in range(50):
        b.finished("x.jsonl", None)
    with pytest.raises(ErrorBudgetExceeded, match=r"^stopped: 11 of the 61 rows generated are error rows"):
        for _ in range(50):
            b.finished("x.jsonl", "reached max_new_tokens (8) before the JSON schema could end")
    assert "Most common (11 rows): reached max_new_tokens (N) before the JSON schema could end" in str(
        b.message("", "max_error_fraction", 0.1)
    )
