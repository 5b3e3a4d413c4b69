"""The model zoo: every recommender fits on ``Interactions`` and scores the whole catalog.

Importing this package registers every model under its name (see ``base.build``).
"""

from training.recommenders import classic, neural, ranker, spark_models  # noqa: F401  (registration)
from training.recommenders.base import REGISTRY, Recommender, build

__all__ = ["REGISTRY", "Recommender", "build"]
