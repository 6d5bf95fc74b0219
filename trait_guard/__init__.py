"""trait_guard: guard a student model against traits hidden in teacher-generated data.

The library imports no Ray or DeepSpeed at top level; heavy submodules load on first use.
"""

__version__ = "0.1.0"
