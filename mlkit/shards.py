"""Each Horovod rank reads its own shard of a Parquet training set, never the whole file.

A training set is written in row groups of :data:`ROW_GROUP` rows; rank ``r`` of ``n`` reads
row groups ``r, r + n, r + 2n, ...`` (interleaved, so every rank sees every period of a
time-ordered file). With fewer row groups than ranks (a small set) each rank reads the file
and keeps rows ``r::n``. The shards are disjoint and together are the file.

Horovod's allreduce needs the same number of steps on every rank, and interleaved row
groups differ by at most one group: :class:`ShardSampler` draws a fresh permutation of the
rank's rows every epoch and wraps it to the largest shard's length (a rank with a smaller
shard repeats a few of its rows, as ``DistributedSampler`` pads).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

ROW_GROUP = 65_536  # rows per Parquet row group of a training set (the unit of a shard)


def read_shard(
    path: Path, rank: int, size: int, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Rank ``rank`` of ``size``'s rows of the Parquet file ``path`` (see the module doc)."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    cols = list(columns) if columns is not None else None
    groups = file.num_row_groups
    if groups >= size:
        return file.read_row_groups(list(range(rank, groups, size)), columns=cols).to_pandas()
    return file.read(columns=cols).to_pandas().iloc[rank::size].reset_index(drop=True)


class ShardSampler(torch.utils.data.Sampler[int]):
    """A permutation of this rank's ``local`` rows per epoch, wrapped to ``length`` (the
    largest shard: every rank takes the same number of steps)."""

    def __init__(self, local: int, length: int, seed: int) -> None:
        if local == 0 and length > 0:
            raise ValueError("this rank's shard is empty while another's is not")
        self.local, self.length, self.seed, self.epoch = local, length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.local)
        return iter(np.resize(order, self.length).tolist())

    def __len__(self) -> int:
        return self.length
