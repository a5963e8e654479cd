"""Helpers shared by the tests (and, for ``references``, the benchmarks).

``params``: parameter factories and an op recorder; ``sync``: the host-sync detector;
``strategies``: hypothesis strategies; ``references``: slow float64 references of
every method. Import as ``from support.references import ...`` (``tests/`` is on
``sys.path`` under pytest; the benchmarks put it there themselves).
"""
