"""One step on the device: build.py (what a rank builds), model_runner.py (launch, wait), inputs.py
(the step's packed arrays), decode_graphs.py and piece_graphs.py (CUDA graphs)."""
