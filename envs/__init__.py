"""Text environments with a common interface (see envs/base.py)."""
