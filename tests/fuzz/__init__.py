"""Atheris fuzzing harnesses (run one with ``python -m tests.fuzz.<harness>``; see docs/SECURITY.md)."""
