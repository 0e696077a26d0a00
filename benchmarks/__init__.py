"""selectserver's benchmark suite: ``python -m benchmarks`` (or ``nox -s bench``).

It runs selectserver and three baselines (``threads``, ``asyncio``, ``rawselect``; see
``benchmarks.impls``) on the same scenarios in one process, interleaved, and prints medians,
ranges and ratios to each baseline, with the project's targets as pass/fail columns.
``python -m benchmarks --quick`` is a smoke run; ``--scenarios`` and ``--impls`` pick a subset;
``--markdown PATH`` writes the table for the README. ``python -m benchmarks.profile`` profiles
selectserver's reactor thread in one scenario.
"""
