"""hcd-distill's data: datasets (``datasets``), samplers (``samplers``) and the loaders registry (``loaders``:
timm, dali)."""
