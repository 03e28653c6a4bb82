"""Data-parallel rendering under torchrun: which process this is, which stories are its, and how the
processes tell each other what they did.

torchrun starts one process per GPU, on one node or several, and sets RANK, LOCAL_RANK and WORLD_SIZE.
Every process reads the same scripts and computes the same plan (`assign`), so no story list is ever sent.
What is sent: rank 0's view of which outputs are finished (one broadcast, so that all ranks agree even while
files appear), and, through the rendezvous key-value store, chunk counts for rank 0's progress bar and each
rank's report at the end. A rank that finishes early waits on the store, not inside a collective that could
time out while the others render.

torch is imported inside the functions: the CLI asks `rank_env()` before it loads anything.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

# Long enough for the slowest rank to load its model before the first collective; stories themselves are
# never waited for inside a collective.
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun job."""

    rank: int  # 0 .. world_size-1, over every node
    local_rank: int  # 0 .. processes on this node - 1: the GPU index on this node
    world_size: int
    restart: int = 0  # torchrun's restart count: keys of an earlier attempt are not read again
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv | None:
    """The torchrun variables of this process, or None when it was not started by torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None
    try:
        world_size, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        restart = int(environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    except ValueError as error:
        raise ValueError(f"the torchrun variables RANK/LOCAL_RANK/WORLD_SIZE are not numbers: {error}") from None
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world_size}, or LOCAL_RANK {local_rank} outside "
                         f"LOCAL_WORLD_SIZE {local_world_size}")  # fmt: skip
    return RankEnv(rank, local_rank, world_size, restart, local_world_size)


def rank_device(env: RankEnv, requested: str | None, gpus_here: int) -> str:
    """This rank's device: `cuda:LOCAL_RANK` (for None or 'cuda' where there are GPUs), else 'cpu'.

    A device with an index is refused (ValueError): every rank would take that one GPU; so are more
    processes on this node than it has GPUs.
    """
    if requested is None:
        requested = "cuda" if gpus_here else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested != "cuda":
        raise ValueError(f"--device {requested}: under torchrun each process renders on cuda:LOCAL_RANK")
    if env.local_world_size > gpus_here:
        processes = env.local_world_size
        raise ValueError(f"torchrun started {processes} processes on this machine, which has {gpus_here} GPU(s)")
    return f"cuda:{env.local_rank}"


def assign(costs: Sequence[float], ranks: int) -> list[list[int]]:
    """Share stories out: the costliest first, each to the rank with the least work so far.

    Returns, for every rank, the indices of its stories in the order it renders them. Ties go to the
    earlier story and the lower rank, so every process computes the same plan from the same costs.
    """
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    loads = [0.0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += costs[index]
    return shares


@dataclass(frozen=True)
class StoryOutcome:
    """What became of one story of a rank's share."""

    index: int  # position in the batch
    rendered: bool
    message: str = ""  # why it failed
    seconds: float = 0.0
    video_frames: int = 0
    skipped: bool = False  # finished by another process before this rank came to it
    in_progress: bool = False  # another live memflow process is rendering it


@dataclass(frozen=True)
class RankReport:
    """One rank's account of its share, posted to rank 0 at the end."""

    rank: int
    device: str
    load_s: float
    render_s: float
    outcomes: tuple[StoryOutcome, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> RankReport:
        data = json.loads(text)
        data["outcomes"] = tuple(StoryOutcome(**outcome) for outcome in data["outcomes"])
        return cls(**data)


class Board:
    """The keys the ranks share in the rendezvous store: chunks and stories done (counters), one report per rank.

    The store's `add` returns the new value, so `add(key, 0)` reads a counter without waiting.
    """

    def __init__(self, store: dist.Store, env: RankEnv):
        import torch.distributed as dist

        self._store = dist.PrefixStore(f"memflow/{env.restart}", store)
        self._env = env

    def add_chunks(self, chunks: int) -> None:
        self._store.add("chunks", chunks)

    def chunks_done(self) -> int:
        return self._store.add("chunks", 0)

    def add_story(self) -> None:
        self._store.add("stories", 1)

    def stories_done(self) -> int:
        return self._store.add("stories", 0)

    def post(self, report: RankReport) -> None:
        self._store.set(f"report/{report.rank}", report.to_json())
        self._store.add("reports", 1)

    def reports_posted(self) -> int:
        return self._store.add("reports", 0)

    def reports(self) -> list[RankReport]:
        """Every rank's report, by rank; call once `reports_posted()` is the world size."""
        return [RankReport.from_json(self._store.get(f"report/{rank}")) for rank in range(self._env.world_size)]


@contextmanager
def process_group(env: RankEnv, device: torch.device) -> Iterator[Board]:
    """Join the torchrun job (nccl on CUDA, gloo on CPU) for the length of the block; yields the shared board.

    The process group is destroyed on the way out, also after an error.
    """
    import torch
    import torch.distributed as dist

    store, rank, world_size = next(dist.rendezvous("env://", timeout=RENDEZVOUS_TIMEOUT))
    store.set_timeout(RENDEZVOUS_TIMEOUT)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # collectives and CUDA graphs use the current device
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=dist.PrefixStore("default_pg", store), rank=rank,
        world_size=world_size, timeout=RENDEZVOUS_TIMEOUT, device_id=device if cuda else None,
    )  # fmt: skip
    try:
        yield Board(store, env)
    finally:
        dist.destroy_process_group()


def from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank (a broadcast; every rank must call it)."""
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` with `option VALUE` and `option=VALUE` removed (how `--gpus N` is kept from the processes it starts)."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == option:
            skip_value = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def launch_problem(processes: int, device: str | None, gpus_here: int | None = None) -> tuple[str, str] | None:
    """What is wrong with `--gpus N` on this machine (message, hint), or None."""
    if device not in (None, "cpu", "cuda"):
        return f"--device {device}: with --gpus each process renders on a GPU of its own", "give --device cuda"
    if gpus_here is None:
        import torch

        gpus_here = torch.cuda.device_count()
    if device != "cpu" and processes > gpus_here:
        hint = f"use --gpus {gpus_here}" if gpus_here else "add --device cpu to share the stories over CPU processes"
        return f"--gpus {processes}: {gpus_here} CUDA GPU(s) here", hint
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device == "cpu" and processes > cores:  # each process renders with a core or more: more only wait
        return f"--gpus {processes} --device cpu: {cores} CPU core(s) here", f"use --gpus {cores} or fewer"
    return None


def launch(argv: Sequence[str], processes: int) -> int:
    """Run `python -m memflow_cli ARGV` in `processes` processes on this machine, as `torchrun --standalone
    --nproc-per-node` does (torch's own launcher); returns rank 0's exit code, else the first failure's.

    memflow's rank 0 says what failed or was stopped; the launcher's own reports (a `ChildFailedError`, a
    `SignalException` traceback on Ctrl-C, SIGTERM or SIGHUP, its note on OMP_NUM_THREADS) would repeat it
    or are for users of torchrun, so its logging is off and its exceptions become the exit code.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "memflow_cli", *argv])
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # torch's elastic loggers each set their own level: only this silences them
    try:
        run(args)
    except ChildFailedError as error:
        failure = error.failures.get(0) or next(iter(error.failures.values()))
        code = failure.exitcode
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
    except SignalException as stop:  # the processes were stopped with this launcher, and have said so
        return 128 + int(stop.sigval)
    except KeyboardInterrupt:
        return 128 + int(signal.SIGINT)
    finally:
        logging.disable(previous)
    return 0
