"""The contract every recommender of the zoo follows, and the registry of their names.

A recommender is fitted on the training ``Interactions`` and returns, for a batch of user
indices, a dense ``(len(users), n_items)`` float32 score matrix over the whole catalog. Ranking,
exclusion of seen items (a protocol choice, not a model choice) and metrics are done outside
the model by ``training.metrics``, so every model is evaluated by the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from training.interactions import Interactions


@runtime_checkable
class Recommender(Protocol):
    name: ClassVar[str]

    def fit(self, data: Interactions) -> Recommender:
        """Learn from ``data`` (the split's training part); returns ``self``."""
        ...

    def score(self, users: np.ndarray) -> np.ndarray:
        """Scores of every catalog item for each user index in ``users`` (higher is better).

        Users unseen at fit time must still get a row (e.g. popularity).
        """
        ...


REGISTRY: dict[str, Callable[..., Recommender]] = {}


def register(cls: type) -> type:
    """Class decorator: make a recommender selectable by its ``name`` (DAG Params, CLI)."""
    REGISTRY[cls.name] = cls
    return cls


def build(name: str, **config: Any) -> Recommender:
    """Instantiate a registered recommender; unknown names and bad configs fail before fitting."""
    import training.recommenders  # noqa: F401  (registers the zoo)

    if name not in REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(REGISTRY)}")
    try:
        return REGISTRY[name](**config)
    except TypeError as err:
        raise ValueError(f"bad config for model '{name}': {err}") from err
