"""The frozen teacher: its tap (``tap``), speed switches (``speed``), and the feature cache (``cache``: format
and replay; ``build``: ``build_cache``)."""
