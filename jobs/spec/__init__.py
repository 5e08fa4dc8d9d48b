"""The job spec: job.py (JobSpec, load_spec), sampling.py (the sampling: section), base.py (SpecError)."""
