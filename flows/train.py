"""A thin Prefect flow around ``etc_data.train.train_model``; the metrics become a table artifact."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from etc_data.models import convmixer_config
from etc_data.train import TrainConfig, train_model


@flow(name="etc-train", log_prints=False, persist_result=False)
def train_flow(shards: str | list[str], out: str, test_shards: str | list[str] | None = None,
               key_ref: str | None = None, trust: list[str] | None = None, model: dict | None = None,
               epochs: int = 10, batch_size: int = 128, lr: float = 0.01, cutmix_mode: str = "timm",
               device: str = "auto", workers: int = 2, resume: bool = False,
               storage_options: dict | None = None) -> dict:
    cfg = TrainConfig(shards=shards, test_shards=test_shards, out=out, key_ref=key_ref, trust=list(trust or []),
                      model=model or convmixer_config(), epochs=epochs, batch_size=batch_size, lr=lr,
                      cutmix_mode=cutmix_mode, device=device, workers=workers, resume=resume,
                      storage_options=storage_options or {},
                      worker_start="spawn")  # forked DataLoader workers die next to Prefect's threads
    metrics = train_model(cfg, progress=False)
    create_table_artifact([{k: m[k] for k in ("epoch", "train_loss", "test_acc", "img_per_s")} for m in metrics],
                          key="train-metrics", description=f"etc-data train: {out}")
    return {"epochs": len(metrics), "test_acc": metrics[-1]["test_acc"] if metrics else None, "out": out}
