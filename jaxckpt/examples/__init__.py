"""Runnable tutorials; ``examples/`` at the repository root links to these files."""
