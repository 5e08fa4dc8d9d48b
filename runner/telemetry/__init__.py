"""What a running job reports: monitor.py (heartbeats, metrics), progress.py, phases.py, attempts.py."""
