"""Experiments around AGD: the paper's sweeps, figures and tables, built on the trainer.

- ``grids``: what each named grid runs, at each scale.
- ``sweep``: ``agd sweep NAME`` runs a named grid of ``agd train`` runs, skipping finished ones.
- ``plot``: ``agd plot DIR...`` draws the paper's figures from run directories (``plot_panels``:
  a panel per setting, for the results page's momentum and models grids).
- ``results``: reads run directories into tables; writes docs/results.md (``findings``: its
  building blocks; ``results_momentum``, ``results_models``: two of its sections).

Nothing here is imported by ``import torch_agd`` or by the trainer: experiments use torch_agd.train,
never the reverse. matplotlib is imported only when a figure is actually made.
"""
