"""Thin adapters that put the framework-free guard into training frameworks.

Each module imports its framework lazily: ``torch_loop`` (plain PyTorch), ``hf`` (transformers
Trainer), ``deepspeed`` (a DeepSpeed engine), ``ray_train`` (Ray Train workers with DeepSpeed).
"""
