"""Data-parallel SFT and PPO over several processes, with PyTorch's own `torch.distributed`.

A stage whose `processes` is N > 1 runs itself again under torchrun (`relaunch`): N copies of the
same script, one per CPU share or GPU, joined in one process group (`process_group`: gloo on the
CPU, nccl on GPUs). Each copy trains on its share of every batch; the helpers below are what the
training code calls to combine the shares, and each is a no-op when there is one process (no
process group), so `upbeat/sft.py` and `upbeat/ppo.py` read the same either way:

- `all_sum`: a tensor summed over the processes (global counts, sums for means and variances);
- `all_rows`: equal-sized per-process tensors concatenated along dim 0 (per-episode metrics);
- `sum_gradients`: the trained parameters' gradients summed over the processes, after each
  process's loss was divided by the *global* token count, so the sum is the gradient of the
  whole batch's loss. An explicit all-reduce rather than DDP: PPO's hydra runs each forward over
  a cached trunk with swapped-in reference blocks, which DDP's hooks do not expect, and one
  flattened all-reduce per optimizer step is all DDP would do here;
- `rank`, `size`, `is_main`, `broadcast`: who writes files (the main process alone) and how the
  others learn what it decided.

Tensors given to a collective live on the process's device (its GPU with nccl, the CPU with gloo).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from upbeat.errors import UpbeatError
from upbeat.models import set_threads

if TYPE_CHECKING:
    from upbeat.config import PolicyParams

# Set by torchrun in every process it starts: the mark of a process already launched.
LAUNCHED_ENV = "TORCHELASTIC_RUN_ID"


class LaunchError(UpbeatError):
    """The processes asked for cannot run here (more than the GPUs, or a launcher mismatch)."""


# --- who am I -----------------------------------------------------------------------------------


def size() -> int:
    """Processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's index in the run, 0 to size() - 1."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the outputs: checkpoints, models, metrics, MLflow records."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


# --- combining the shares -------------------------------------------------------------------------


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every process (a new tensor; `t` itself with one process)."""
    if size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def all_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` (the same shape on each) concatenated along dim 0, in rank order."""
    if size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over every process, in place, as one flat all-reduce. A
    parameter without a gradient here (a process with no rows in this batch) counts as zeros."""
    if size() == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def broadcast(obj: Any) -> Any:
    """The main process's `obj` on every process (small picklable values: a path, a step)."""
    if size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- starting and joining -------------------------------------------------------------------------


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the run's process group when torchrun started this process (nccl for a GPU, gloo on
    the CPU); nothing with one process. Left on exit, also when training raises."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_processes(processes: int, device: str, key: str) -> None:
    """Refuse a process count this machine cannot run: with a GPU, one process per GPU."""
    wants_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if wants_gpu and processes > (gpus := torch.cuda.device_count()):
        raise LaunchError(
            f"{key}: {processes} processes need {processes} CUDA devices (one each), but "
            f"{gpus} {'is' if gpus == 1 else 'are'} visible; set {key} to at most {gpus}, or "
            "policy.device: cpu"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if LAUNCHED_ENV in os.environ and launched != processes:
        raise LaunchError(
            f"{key} is {processes}, but torchrun started {launched} processes; run the stage "
            f"without torchrun (it launches itself) or set {key}: {launched}"
        )


def relaunch(processes: int, policy: PolicyParams, key: str) -> int | None:
    """Run this script again under torchrun with `processes` processes and wait for them.

    Returns their exit code (128 + N when stopped by signal N), or None when there is nothing to
    launch (one process, or already under torchrun): then the caller goes on itself. SIGTERM and
    SIGINT are passed to torchrun, which stops its processes and exits, so a flow run or a Ctrl-C
    stops the whole stage. Each process gets its share of the CPU threads (`policy.num_threads`,
    or the physical cores divided among them). `key` names the parameter in errors.
    """
    check_processes(processes, policy.device, key)
    if processes == 1 or LAUNCHED_ENV in os.environ:
        return None
    threads = set_threads(policy.num_threads, processes)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", sys.argv[0], *sys.argv[1:],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    child = subprocess.Popen(cmd, env=env)
    stopped_by: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped_by.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped_by:  # torchrun reports a stop as a failure of its own: say which signal it was
        return 128 + stopped_by[0]
    if code != 0:  # the last line a log shows, after torchrun's own report
        print(
            f"error: {sys.argv[0]}: one of its {processes} processes failed (torchrun exit "
            f"{code}); that process's own error is above",
            file=sys.stderr,
        )
    return 128 - code if code < 0 else code
