"""One run of the paper's protocol: the loop (trainer.py), what a checkpoint holds (state.py,
checkpoint.py), the run's inputs (data.py), its device and kernel choices (runtime.py), and
evaluation (evaluation.py)."""
