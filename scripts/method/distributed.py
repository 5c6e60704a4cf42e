"""Multi-process (DistributedDataParallel) helpers for configs/multi_gpu_train.yaml.

The trainer runs one `TwoViewForward` per modality network (one call per iteration, as DDP
requires); for multi-GPU training each of those is wrapped in PyTorch's
`DistributedDataParallel` and handed to `CMERTrainer(training_nets=...)`. The wrapped modules
share their parameters with `network.nets`, so checkpoints stay plain `MultiModalCAM` state
dicts and the validator keeps using the bare networks.

Rank queries work before `init_process_group` too (they read torchrun's RANK / LOCAL_RANK /
WORLD_SIZE), so config expressions can be evaluated in any order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from scripts.method.trainer import TwoViewForward


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank: from the process group when there is one, else torchrun's RANK (default 0)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """Rank on this node (torchrun's LOCAL_RANK, default 0): the GPU index of this process."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0: the process that validates, logs and writes checkpoints."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: cuda:<LOCAL_RANK> when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def main_process_first_begin() -> None:
    """First half of "rank 0 first": every other rank waits here until rank 0 calls `..._end`.

    Used around one-off preparation that writes shared files (phantom, datalist, cache), so
    the other ranks find them ready instead of racing to build them.
    """
    if not is_main_process():
        barrier()


def main_process_first_end() -> None:
    """Second half of "rank 0 first": rank 0 releases the ranks waiting in `..._begin`."""
    if is_main_process():
        barrier()


def ddp_training_nets(network, device: torch.device | str | None = None, concat_views: bool = True,
                      sync_batchnorm: bool = False, **ddp_kwargs) -> list[torch.nn.Module]:
    """`DistributedDataParallel(TwoViewForward(net))` for every modality network of `network`.

    `device` is this process's device (CPU / gloo: no device_ids). `sync_batchnorm` converts
    each network's BatchNorm layers to SyncBatchNorm in place (CUDA only; parameters are kept,
    so optimisers built earlier stay valid). Extra keyword arguments go to DDP.
    """
    if not is_initialized():
        raise RuntimeError("ddp_training_nets needs torch.distributed.init_process_group() first "
                           "(multi_gpu_train.yaml does it in `initialize`)")
    device = torch.device(device) if device is not None else next(network.parameters()).device
    wrapped = []
    for index, net in enumerate(network.nets):
        if sync_batchnorm:
            if device.type != "cuda":
                raise ValueError("sync_batchnorm needs CUDA devices")
            network.nets[index] = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        wrapped.append(torch.nn.parallel.DistributedDataParallel(
            TwoViewForward(net, concat_views), device_ids=device_ids, **ddp_kwargs))
    return wrapped
