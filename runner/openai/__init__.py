"""The OpenAI Batch API: batch.py (request lines), prompts.py (requests to prompts), response.py (output
lines)."""
