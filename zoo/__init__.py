"""The model zoo: every recommender fits on ``Interactions`` and scores the whole catalog.

Importing this package registers every model under its name (see ``base.build``).
"""

from zoo import classic, hybrid, neural, spark_models  # noqa: F401  (registration)
from zoo.base import REGISTRY, Recommender, build

__all__ = ["REGISTRY", "Recommender", "build"]
