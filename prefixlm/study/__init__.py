"""The study: runs grouped into arms and seeds, paired statistics, the report's evidence.

numpy, scipy and matplotlib only, never JAX: a report of finished runs builds on a laptop.

- ``report_md``: REPORT.md (``build_report``) and ``plan`` (the seeds a study needs).
- ``runs``: load run directories, group arms, pair seeds, align items.
- ``item_stats``: paired statistics over the same items (bootstrap, McNemar).
- ``seed_stats``: seed-level t-tests, Holm, power and the seeds a study needs.
- ``endpoints``: the primary endpoints and their values at a step.
- ``detectable``: what a study could detect (minimum detectable effects).
- ``figures``: metric curves, the forest plot and per-task curves.
- ``sim``: simulated studies (``python -m prefixlm.study.sim``).
"""
