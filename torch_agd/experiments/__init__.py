"""Experiments around AGD: the peers it is compared with, the paper's sweeps, figures and tables.

- ``peers``: learning-rate-free optimizers at their published defaults (``PEERS``).
- ``sweep``: ``agd sweep NAME`` runs a named grid of ``agd train`` runs, skipping finished ones.
- ``plot``: ``agd plot DIR...`` draws the paper's figures from run directories.
- ``results``: reads run directories into tables; writes docs/results.md.

Nothing here is imported by ``import torch_agd``; matplotlib and the peer packages are imported
only when a figure or a peer is actually made.
"""
