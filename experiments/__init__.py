"""Experiment scripts for taskbalance: ``python -m experiments.<name>``.

* ``experiments.train``: one training run of one strategy on any benchmark.
* ``experiments.compare``: every registered strategy on any benchmark over several seeds.
* ``experiments.reproduce``: paper reproductions with a verdict each.

``experiments.benchmarks`` holds the benchmarks (Multi-Digits, MultiMNIST, NYUv2, Cityscapes,
CelebA, or your own) behind one protocol; ``experiments.training`` the training loop every script
shares (devices, mixed precision, DDP, checkpoints); ``experiments.runner`` the rest (typed
config with command-line overrides, W&B tracking, seeds, results tables).
"""
