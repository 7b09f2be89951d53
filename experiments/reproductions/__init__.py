"""Paper reproductions, one module per reproduction (run them with ``python -m
experiments.reproduce NAME``).

Every module has the same shape:

* ``NAME``, ``TITLE``, ``PUBLISHED`` (the paper's values or claims, with ``"source"``) and
  ``CRITERION`` (how a claim is judged, in words);
* ``verdict(measured) -> (checks, verdict)``: a pure function of the measured values (the
  ``measured`` of the result file), one :class:`~experiments.reproductions.common.Check` per
  published claim, so that a committed result file can be judged again and the criteria can be
  unit-tested on made-up measurements;
* ``run(config) -> (result, figure)``: the training at the paper's settings, which measures,
  judges with ``verdict`` and writes ``<out>/<NAME>.json`` and ``.png``.

What they share is in :mod:`.common` (config, result record, the verdict rule, output) and
:mod:`.pareto_toy` (the runs on the two-objective toy of the CAGrad and FAMO papers).
"""
