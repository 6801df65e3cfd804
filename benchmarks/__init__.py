"""Benchmarks of hcd_fast against the eager reference and torch.compile."""
