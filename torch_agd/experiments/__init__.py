"""Experiments around AGD: the paper's sweeps, figures and tables, built on the trainer.

- ``sweep``: ``agd sweep NAME`` runs a named grid of ``agd train`` runs, skipping finished ones.
- ``plot``: ``agd plot DIR...`` draws the paper's figures from run directories.
- ``results``: reads run directories into tables; writes docs/results.md.

Nothing here is imported by ``import torch_agd`` or by the trainer: experiments use torch_agd.train,
never the reverse. matplotlib is imported only when a figure is actually made.
"""
