"""Tensor parallelism on one host: rank 0 schedules, every rank runs the same forward.

``tokenspeed serve --tp N`` (``build_engine(tp=N)``) starts N-1 worker processes. Each rank
loads its shard of the model (``ParallelContext`` over all N ranks: attention heads, MLPs
and experts split N ways; the SPMD compiler inserted the collectives), sizes the same KV
pool (the smallest any rank can hold) and, on GPUs, captures the same decode graphs.

Rank 0 runs the engine and the scheduler. For every step it broadcasts the step's
:class:`~tokenspeed_engine.model_runner.StepInputs` (host arrays, pickled over a gloo group,
so the GPUs' NCCL streams never wait for the host) and then the resolved input ids (a device
tensor over the model's group: NCCL on GPUs, enqueued on the stream like any kernel, so
one-step overlap still holds). Then every rank runs ``TorchModelRunner.execute``; the
model's collectives keep the ranks in step, the logits come out replicated and only rank 0
samples. A ``None`` step tells the workers to exit.

A worker that dies takes the replica down: rank 0's watchdog exits the process rather
than leave it waiting forever in a collective.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import threading
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenspeed_engine.forward_batch import to_device
from tokenspeed_engine.model_runner import StepInputs, TorchModelRunner
from tokenspeed_engine.scheduler import Plan

log = logging.getLogger("tokenspeed.tp")

# Loading a large checkpoint happens between two collectives (the group set-up and the KV-pool
# agreement), so the collective timeout must outlast the slowest rank's load.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, rank: int) -> torch.device:
    """Rank r uses GPU r of the visible ones (one host), or the CPU."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def init_distributed(rank: int, world: int, port: int, device_type: str) -> Any:
    """Join the N-rank group (NCCL on GPUs, gloo on CPU); returns the gloo group for host messages."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    return dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


def agree_min(value: int, cpu_group: Any) -> int:
    """The smallest ``value`` over all ranks (e.g. KV pages every rank can hold)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
    return int(t.item())


class StepChannel:
    """Rank 0 -> workers: each step's host inputs, then its device input ids."""

    def __init__(self, cpu_group: Any, device: torch.device):
        self.cpu_group, self.device = cpu_group, device

    def send(self, step: StepInputs | None, input_ids: torch.Tensor | None) -> None:
        dist.broadcast_object_list([step], src=0, group=self.cpu_group)
        if step is not None:
            dist.broadcast(input_ids.contiguous(), src=0)

    def recv(self) -> tuple[StepInputs | None, torch.Tensor | None]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        step = box[0]
        if step is None:
            return None, None
        ids = torch.empty(step.input_ids.shape[0], dtype=torch.int64, device=self.device)
        dist.broadcast(ids, src=0)
        return step, ids


class _Watchdog(threading.Thread):
    """Exits rank 0 when a worker dies unasked: the next collective would otherwise wait forever."""

    def __init__(self, procs: list[Any]):
        super().__init__(name="tokenspeed-tp-watchdog", daemon=True)
        self.procs, self.stopping = procs, threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for p in self.procs:
                if p.exitcode is not None and not self.stopping.is_set():
                    log.error("tensor-parallel worker %s exited with code %s; stopping", p.name, p.exitcode)
                    os._exit(1)


class TPModelRunner:
    """Rank 0's runner: broadcasts each step to the workers, then runs its own shard."""

    supports_overlap = True

    def __init__(self, local: TorchModelRunner, channel: StepChannel, procs: list[Any], watchdog: _Watchdog):
        self.local, self.channel, self.procs, self.watchdog = local, channel, procs, watchdog
        self.vocab_size, self.num_pages, self.page_size = local.vocab_size, local.num_pages, local.page_size
        self.max_model_len, self.device = local.max_model_len, local.device
        self.world_size = len(procs) + 1
        self._closed = False

    def forward(self, plan: Plan, block_table: np.ndarray, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        step = StepInputs.from_plan(plan, block_table, self.page_size)
        if input_ids is None:
            if (step.input_ids < 0).any():
                raise ValueError("the plan has input ids still unknown (-1); pass them as input_ids")
            input_ids = to_device(step.input_ids, self.device)
        self.channel.send(step, input_ids)
        return self.local.execute(step, input_ids)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (they finish the steps already sent) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        self.watchdog.stopping.set()
        try:
            self.channel.send(None, None)
        except (RuntimeError, ConnectionError) as exc:  # a worker already gone: terminate the rest below
            log.warning("could not tell the tensor-parallel workers to stop: %s", exc)
        for p in self.procs:
            p.join(timeout)
            if p.exitcode is None:
                log.warning("tensor-parallel worker %s did not stop; terminating it", p.name)
                p.terminate()
        dist.destroy_process_group()


def worker_main(rank: int, world: int, port: int, options: Any) -> None:
    """A worker process: build this rank's runner, then run every step rank 0 broadcasts."""
    from tokenspeed_engine.launch import build_runner
    from tokenspeed_engine.spmd import ParallelConfig, ParallelContext

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(name)s %(levelname)s %(message)s")
    if options.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    cpu_group = init_distributed(rank, world, port, options.device)
    ctx = ParallelContext.from_distributed(ParallelConfig(world_size=world))
    runner = build_runner(options, rank_device(options.device, rank), ctx, lambda n: agree_min(n, cpu_group))
    channel = StepChannel(cpu_group, runner.device)
    while True:
        step, ids = channel.recv()
        if step is None:
            break
        runner.execute(step, ids)
    dist.destroy_process_group()


def start_tensor_parallel(options: Any, world: int) -> TPModelRunner:
    """Start ranks 1..world-1 as processes, join them as rank 0, and build rank 0's runner."""
    from tokenspeed_engine.launch import build_runner
    from tokenspeed_engine.spmd import ParallelConfig, ParallelContext

    if options.device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"--tp {world} needs {world} GPUs; {torch.cuda.device_count()} are visible")
    port = free_port()
    spawn = mp.get_context("spawn")
    procs = [
        spawn.Process(target=worker_main, args=(r, world, port, options), name=f"tokenspeed-tp{r}", daemon=True)
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    watchdog = _Watchdog(procs)
    watchdog.start()
    # At interpreter exit multiprocessing terminates the (daemon) workers; atexit runs this first
    # (last registered, first run), so the watchdog does not take that for a crash.
    atexit.register(watchdog.stopping.set)
    if options.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cpu_group = init_distributed(0, world, port, options.device)
    ctx = ParallelContext.from_distributed(ParallelConfig(world_size=world))
    runner = build_runner(options, rank_device(options.device, 0), ctx, lambda n: agree_min(n, cpu_group))
    log.info("tensor parallel: %d ranks (%s)", world, "NCCL" if options.device == "cuda" else "gloo")
    return TPModelRunner(runner, StepChannel(cpu_group, runner.device), procs, watchdog)
