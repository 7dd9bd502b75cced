"""The run configs shipped with jaxdistil (package data of ``jaxdistil.configs``).

In the source tree they live in ``configs/``; installed, in the package. ``--config NAME`` finds
them by name wherever the command runs (``jaxdistil.config.resolve_config``).
"""
