"""Multi-process test harness (gloo on CPU, every world has a timeout)."""
