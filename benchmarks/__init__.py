"""Benchmarks of resnet_fused against eager PyTorch, torch.compile and cuDNN's convolutions alone.

`python -m benchmarks --help`; workloads.py defines what is measured, providers.py how each provider runs it.
"""
