"""Side-by-side speed and memory benchmarks of medvox against MONAI/TorchIO pipelines (``run.py``)."""
