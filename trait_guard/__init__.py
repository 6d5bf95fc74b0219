"""trait_guard: guard a student model against traits hidden in teacher-generated data.

The library imports no Ray, DeepSpeed or MLflow at top level; heavy submodules load on first use. Those
three are optional (pyproject.toml's extras): ``pip install trait-guard`` is enough for the guard and its
HF / plain-torch integrations, and what needs an extra says which on first use (trait_guard/extras.py).
"""

__version__ = "0.1.0"
