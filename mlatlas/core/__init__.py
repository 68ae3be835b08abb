"""Shared infrastructure: configs, runs and checkpoints, runtime, plots and network blocks."""
