"""Error rows: budget.py (a job of mostly errors stops) and reasons.py (an error's reason, for counting)."""
