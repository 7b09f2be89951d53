"""Experiment scripts for taskbalance: ``python -m experiments.<name>``.

* ``experiments.compare``: every registered strategy on Multi-Digits over several seeds.
* ``experiments.reproduce``: paper reproductions with a verdict each.

``experiments.runner`` holds the pieces they share (typed config with command-line overrides,
W&B tracking, seeds, checkpoints, results tables); ``experiments.data`` and
``experiments.models`` the Multi-Digits benchmark and its LeNet-style model.
"""
