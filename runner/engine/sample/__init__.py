"""Choosing the next token: sampler.py (on the device), grammar.py and grammar_worker.py (structured
output)."""
