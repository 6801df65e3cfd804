"""Experiments that write results (not part of the installed package): ``python -m experiments.demo``
(``make demo``) and ``python -m experiments.cache_study``."""
