"""The processes of an online run under torchrun / accelerate launch: rank, share, gather, broadcast, barrier.

In one process (WORLD_SIZE unset or 1) every call is a no-op that returns what that one process holds, so
the recipe reads the same for one process and for several. The main process (rank 0) alone writes,
evaluates and checkpoints; each process takes every size-th interaction of a batch and DDP all-reduces
the gradient of the union batch (docs/online.md, "Batches and several processes")."""
from __future__ import annotations

import dataclasses
import datetime
import os


class World:
    def __init__(self, rank: int | None = None, size: int | None = None):
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.size = int(os.environ.get("WORLD_SIZE", 1)) if size is None else size
        self.main = self.rank == 0

    def share(self, items: list) -> list:
        """This process's share of a batch: every size-th item from its rank."""
        return items[self.rank::self.size]

    def start(self, sdpo):
        """Join the process group (gloo on CPU, nccl on GPUs); returns `sdpo` with this process's device."""
        if self.size == 1:
            return sdpo
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available() and sdpo.device in ("auto", "cuda"):
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            torch.cuda.set_device(local)
            sdpo = dataclasses.replace(sdpo, device=f"cuda:{local}")
        if not dist.is_initialized():
            # The others wait at a barrier through each evaluation (a large judge may take long): a generous timeout.
            dist.init_process_group("nccl" if torch.cuda.is_available() and sdpo.device.startswith("cuda")
                                    else "gloo", timeout=datetime.timedelta(hours=4))
        return sdpo

    def distribute(self, updaters) -> None:
        """Wrap each updater's model in DDP (several processes only)."""
        if self.size == 1:
            return
        for updater in updaters:
            updater.distribute(device_ids=[updater.device.index] if updater.device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """The main process's `value`, on every process."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        found = [value]
        dist.broadcast_object_list(found)
        return found[0]

    def gather(self, value) -> list:
        """Every process's `value`, in rank order, on every process."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        shares = [None] * self.size
        dist.all_gather_object(shares, value)
        return shares

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
