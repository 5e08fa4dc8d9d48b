"""Reading the input and talking to storage: sources.py, storage.py, parquet_files.py, retry.py, memory.py."""
