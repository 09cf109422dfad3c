"""torchrun support: one process per device, DistributedDataParallel, rank 0 logs.

``torchrun --nproc-per-node N -m facetag train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @classmethod
    def from_env(cls) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as tdist

        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not tdist.is_initialized():
            # gloo on CPU, NCCL when every process has its own GPU
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            tdist.init_process_group(backend=backend)
        return cls(rank=rank, world_size=world, local_rank=local, active=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def loader(
        self, data: Dataset[Any], batch_size: int, seed: int, workers: int
    ) -> DataLoader[Any]:
        """Shuffled batches; every rank sees a disjoint shard, reshuffled per epoch seed."""
        g = torch.Generator().manual_seed(seed)
        # BatchNorm cannot normalise a batch of one: drop a lone last sample (it is seen
        # in other epochs, since the order changes every epoch).
        per_rank = len(data) // self.world_size  # type: ignore[arg-type]
        drop_last = per_rank % batch_size == 1
        if self.active:
            sampler: DistributedSampler[Any] = DistributedSampler(
                data, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
            )
            return DataLoader(
                data,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=workers,
                drop_last=drop_last,
            )
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            generator=g,
            num_workers=workers,
            drop_last=drop_last,
        )

    def broadcast_str(self, value: str | None) -> str | None:
        """Rank 0's value on every rank (the run id names the checkpoint folder)."""
        if not self.active:
            return value
        import torch.distributed as tdist

        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.active:
            import torch.distributed as tdist

            tdist.barrier()
            tdist.destroy_process_group()
