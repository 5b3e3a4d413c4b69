"""Each Horovod rank's shard of a training set: disjoint, together the whole file, and every
rank stepping the same number of times."""

import numpy as np
import pandas as pd
import pytest

from mlkit.shards import ShardSampler, read_shard


@pytest.mark.parametrize(("rows", "row_group", "size"), [(100, 7, 3), (100, 64, 3), (10, 100, 2)])
def test_shards_are_disjoint_and_together_the_file(tmp_path, rows, row_group, size):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"x": np.arange(rows), "y": np.arange(rows) * 2}).to_parquet(
        path, row_group_size=row_group
    )
    shards = [read_shard(path, rank, size, columns=["x"]) for rank in range(size)]
    assert all(list(s.columns) == ["x"] for s in shards)
    seen = np.concatenate([s["x"].to_numpy() for s in shards])
    assert sorted(seen.tolist()) == list(range(rows))  # disjoint and complete
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= max(row_group, 1)


def test_the_sampler_permutes_its_rows_each_epoch_and_pads_to_the_largest_shard():
    sampler = ShardSampler(local=5, length=7, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 7
    assert set(first) == set(range(5))  # every local row, two of them twice
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # seeded by (seed, epoch)
    with pytest.raises(ValueError, match="empty"):
        ShardSampler(local=0, length=4, seed=0)
