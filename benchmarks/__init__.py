"""Benchmarks of hcd_fast against the eager reference and torch.compile."""
import os
import sys

# OpenMP threads spin while waiting by default. On a CPU shared with other processes (the development
# machines: 2 cores, several users) every parallel region then waits for a descheduled spinner, and a
# ~1 ms eager op measured ~400 ms. Passive waiting makes the numbers measure the code, not the scheduler.
# It only takes effect if set before torch (libgomp) loads; an explicit OMP_WAIT_POLICY wins. Recorded in
# every result row (env "omp_wait_policy").
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
