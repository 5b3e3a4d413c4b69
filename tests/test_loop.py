"""``mlkit.loop``: LazyAdam (Adam for dense gradients, SparseAdam for sparse ones) and the
batches a TensorDataset is read in."""

import pytest
import torch
from torch import nn


class Net(nn.Module):
    """An embedding table (sparse or dense gradients) and a dense layer over its rows."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 4, sparse=sparse)
        self.head = nn.Linear(4, 1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(rows)).sum()


def _train(net: Net, optimizers: list[torch.optim.Optimizer], batches) -> None:
    for rows in batches:
        for opt in optimizers:
            opt.zero_grad()
        net(rows).pow(2).backward()
        for opt in optimizers:
            opt.step()


BATCHES = [torch.tensor([1, 2, 2, 5]), torch.tensor([5, 7]), torch.tensor([1, 9, 9, 9])]


def test_sparse_rows_follow_sparse_adam_and_dense_ones_adam():
    from mlkit.loop import LazyAdam

    lazy = Net(sparse=True)
    _train(lazy, [LazyAdam(lazy.parameters(), lr=0.1)], BATCHES)
    oracle = Net(sparse=True)  # torch's own: SparseAdam for the table, Adam for the rest
    _train(oracle, [torch.optim.SparseAdam([oracle.emb.weight], lr=0.1),
                    torch.optim.Adam(oracle.head.parameters(), lr=0.1)], BATCHES)  # fmt: skip
    for (name, a), b in zip(lazy.named_parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    untouched = [r for r in range(30) if r not in {1, 2, 5, 7, 9}]
    torch.testing.assert_close(lazy.emb.weight[untouched], Net(sparse=True).emb.weight[untouched])


def test_dense_gradients_take_adams_own_step_weight_decay_included():
    from mlkit.loop import LazyAdam

    lazy, plain = Net(sparse=False), Net(sparse=False)
    _train(lazy, [LazyAdam(lazy.parameters(), lr=0.1, weight_decay=0.01)], BATCHES)
    _train(plain, [torch.optim.Adam(plain.parameters(), lr=0.1, weight_decay=0.01)], BATCHES)
    for a, b in zip(lazy.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_dense_step_and_a_sparse_one_share_the_state():
    """Horovod's state broadcast takes a dense zero step first; the sparse steps go on from
    the same ``step`` count and moments (one state layout, Adam's)."""
    from mlkit.loop import LazyAdam

    net = Net(sparse=True)
    opt = LazyAdam(net.parameters(), lr=0.1)
    net.emb.weight.grad = torch.zeros_like(net.emb.weight)  # dense, as broadcast_optimizer_state
    opt.step()
    _train(net, [opt], BATCHES[:1])
    state = opt.state[net.emb.weight]
    assert state["step"].item() == 2
    assert state["exp_avg"][[1, 2, 5]].abs().sum() > 0 and state["exp_avg"][0].abs().sum() == 0


def test_amsgrad_is_refused():
    from mlkit.loop import LazyAdam

    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(Net(sparse=True).parameters(), amsgrad=True)


def test_a_tensor_dataset_is_batched_a_batch_at_a_time_into_the_same_batches():
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from mlkit.loop import batch_loader

    data = TensorDataset(torch.arange(23), torch.arange(23).float().unsqueeze(1) * 2)
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(3))
    fast = list(batch_loader(data, sampler, 5))
    sampler.generator.manual_seed(3)
    slow = list(DataLoader(data, batch_size=5, sampler=sampler))  # row by row, collated
    assert [len(b[0]) for b in fast] == [5, 5, 5, 5, 3]
    for a, b in zip(fast, slow, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
