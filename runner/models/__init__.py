"""Models as a job names them: resolve.py (model.path to a folder), gguf.py, fetch.py (URLs), cache.py."""
