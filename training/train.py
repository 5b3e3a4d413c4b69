"""Distributed training of the two-tower model with Horovod (Gloo on CPU, NCCL on GPUs).

Launched by :func:`training.launch.train_distributed` as
``horovodrun -np N -H localhost:N --gloo python -m training.train --run-dir DIR``.
Reads top to bottom: config, distributed setup, data, model, loop. Rank 0 alone writes the
model, the loss curve and the MLflow metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shopml import schema as S
from shopml.config import TrainConfig
from training.data import read_vocab
from training.model import TwoTower, sampled_softmax_loss


def load_examples(run_dir: Path, model: TwoTower) -> torch.utils.data.TensorDataset:
    df = pd.read_parquet(run_dir / "train.parquet")
    item_pos = {item: i for i, item in enumerate(model.item_ids)}
    users = model.user_indices(df[S.USER_ID].tolist())
    items = torch.tensor(df[S.ITEM_ID].map(item_pos).to_numpy(dtype=np.int64))
    feats = torch.tensor(df[list(model.feature_names)].to_numpy(dtype=np.float32))
    return torch.utils.data.TensorDataset(users, feats, items)


def main() -> None:
    # --- config ---------------------------------------------------------------------------
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--config", type=str, required=True, help="TrainConfig as JSON")
    args = parser.parse_args()
    cfg = TrainConfig.model_validate_json(args.config)

    # --- distributed setup ----------------------------------------------------------------
    import horovod.torch as hvd

    hvd.init()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())  # pin each process to one GPU
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))
    torch.manual_seed(cfg.seed)  # same init everywhere (then broadcast from rank 0 anyway)
    sampler_gen = torch.Generator().manual_seed(cfg.seed + hvd.rank())  # negatives differ by rank

    # --- data -------------------------------------------------------------------------------
    vocab = read_vocab(args.run_dir)
    model = TwoTower(vocab["users"], vocab["items"], vocab["popular"], dim=cfg.dim)
    dataset = load_examples(args.run_dir, model)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True, seed=cfg.seed
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)

    # --- model and optimizer ----------------------------------------------------------------
    # LR scaled by the number of workers: the effective batch is size x batch_size.
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr * hvd.size(), weight_decay=cfg.weight_decay
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    run = None
    if hvd.rank() == 0 and os.environ.get("MLFLOW_RUN_ID"):
        import mlflow

        run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])

    # --- loop -------------------------------------------------------------------------------
    curve: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        started, total, batches = time.time(), 0.0, 0
        for users, feats, items in loader:
            optimizer.zero_grad()
            loss = sampled_softmax_loss(model, users, feats, items, cfg.negatives, sampler_gen)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        epoch_loss = hvd.allreduce(torch.tensor(total / max(batches, 1)), name="epoch_loss").item()
        curve.append({"epoch": epoch, "loss": epoch_loss, "seconds": time.time() - started})
        if hvd.rank() == 0:
            print(f"epoch {epoch}: loss {epoch_loss:.4f} ({curve[-1]['seconds']:.1f}s)", flush=True)
            if run is not None:
                import mlflow

                mlflow.log_metric("train_loss", epoch_loss, step=epoch)

    if hvd.rank() == 0:
        model.eval()
        torch.save(model, args.run_dir / "model.pt")
        (args.run_dir / "loss_curve.json").write_text(json.dumps(curve))
        if run is not None:
            import mlflow

            mlflow.end_run()


if __name__ == "__main__":
    main()
