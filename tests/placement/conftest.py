"""Fixtures of the real-Slurm sbatch tests (the lab itself comes from tests/conftest.py)."""

from tests.placement.sbatch_lab import placed

__all__ = ["placed"]
