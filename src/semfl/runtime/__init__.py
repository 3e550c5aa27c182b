"""Runtimes: the local in-process transport, checkpoints, and the run loop."""
