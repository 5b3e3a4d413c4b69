import torch

from mlkit.loop import LazyAdam
from served_model.two_tower import TwoTower, sampled_softmax_loss
from shopml import schema as S
from training.compress import quantize_int8
from training.evaluate import model_size_bytes


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    users = [f"u{i}" for i in range(20)]
    items = [f"i{i}" for i in range(50)]
    model = TwoTower(users, items, popular_items=items[:5], dim=16, sparse=True)
    # each user buys two "own" items: learnable from the id embeddings
    u = torch.arange(1, 21).repeat_interleave(2)
    pos = torch.tensor([(i * 2 + j) % 50 for i in range(20) for j in range(2)])
    feats = torch.rand(len(u), len(S.USER_FEATURES)) * 10
    return model, u, feats, pos


def test_training_reduces_sampled_softmax_loss():
    model, u, feats, pos = _toy()
    gen = torch.Generator().manual_seed(0)
    opt = LazyAdam(model.parameters(), lr=0.05)  # the loop's: sparse embedding gradients
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = sampled_softmax_loss(model, u, feats, pos, 20, gen)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the learned ranking puts each user's own items first
    top = model.recommend(["u0"], [dict.fromkeys(model.feature_names, 5.0)], 2)[0]
    assert {i for i, _ in top} == {"i0", "i1"}


def test_unknown_users_map_to_shared_row_and_missing_features_to_zero():
    model, *_ = _toy()
    assert model.user_indices(["u3", "nobody"]).tolist() == [4, 0]
    t = model.features_tensor([{S.USER_N_EVENTS: None}])
    assert t.shape == (1, len(S.USER_FEATURES)) and float(t.abs().sum()) == 0.0


def test_int8_copy_is_smaller_and_ranks_alike():
    torch.manual_seed(0)
    items = [f"i{i}" for i in range(2000)]
    model = TwoTower([f"u{i}" for i in range(500)], items, items[:5], dim=64)
    q = quantize_int8(model)
    assert model_size_bytes(q) < 0.5 * model_size_bytes(model)
    f = torch.ones(3, len(S.USER_FEATURES))
    users = torch.tensor([1, 2, 3])
    a, b = model(users, f), q(users, f)
    assert torch.allclose(a, b, atol=0.05)
