"""Scheduling on the host: the scheduler's policy, sequences, stop checks and the paged KV cache's books."""
