"""In-memory checkpoints: --local-ckpt-interval N snapshots every rank's whole training state into
node-local memory every N iterations, so that a crash loses at most N iterations (one with N=1)
whatever --save-interval is.

Layout, under `<--local-ckpt-dir, default /dev/shm>/megatron_lite_local/<hash of --save>/`:

    rank_00003/iter_0000120.pt      rank 3's state at iteration 120 (torch.save format)
    rank_00003/iter_0000120.json    its record: size, CRC-32, layout, mode, config, progress, and
                                    the record's own SHA-256; written last, so it commits the pair
    rank_00003/replica_00002_iter_0000120.pt/.json   rank 2's snapshot, held by rank 3

A snapshot holds what a resume needs of one rank: its model and optimizer state (its ZeRO-1 shard
with the distributed optimizer), the schedule, the counters, its own random generators and the
FP8 scaling state. Taking one copies the state to the CPU (that is the only part training waits
for); a background thread serialises it, writes it, and sends it to the rank --replication-jump
ranks further on (default: the same local rank of the next node, the next rank on one node),
which keeps it, so that a lost process or a lost node's memory loses no snapshot. The exchange
starts with a collective of the snapshot records on its own gloo group: once a rank has passed
it, every rank's own file of that iteration is written. Training waits for that point of the
previous snapshot before it logs an iteration, so a process killed after the log line of
iteration L resumes from L or L-1. Each rank keeps its last two snapshots and replicas.

At start-up (`LocalCheckpoints.decide`) every rank verifies what it holds and the ranks agree on
the newest iteration of which every rank's snapshot survives somewhere; when it is newer than the
persistent checkpoint the load would take, the missing files are sent to their owners and the run
resumes from it (the recovery report says so). Snapshots of another layout or another mode are
not used; the others (older, or of another start) are removed, so that a later restart never
mixes two histories. A run that ends normally removes its snapshots after its final save.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import threading
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.arguments import ConfigError
from megatron_lite.checkpoint.formats import OWN_FORMAT, SourceCheckpoint
from megatron_lite.checkpoint.io.storage import all_gather_object, saveable
from megatron_lite.checkpoint.io.torchfile import plan_torch_file, unpickle_torch_file
from megatron_lite.config import RunConfig
from megatron_lite.parallel.state import ParallelState

LOCAL_DIRNAME = "megatron_lite_local"
KEEP = 2   # snapshots (and replicas) each rank keeps
_NAME = re.compile(r"^(?:replica_(\d{5})_)?iter_(\d{7})\.json$")


def local_root(cfg: RunConfig) -> str:
    """This run's snapshot directory: one per --save directory."""
    c = cfg.checkpoint
    base = c.local_ckpt_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    key = hashlib.sha1(os.path.abspath(c.save).encode()).hexdigest()[:16]
    return os.path.join(base, LOCAL_DIRNAME, key)


def _stem(iteration: int, owner: Optional[int] = None) -> str:
    return (f"replica_{owner:05d}_" if owner is not None else "") + f"iter_{iteration:07d}"


def _record_checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _layout(cfg: RunConfig, state: ParallelState) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size, "world": state.world_size,
            "distributed_optimizer": cfg.parallel.use_distributed_optimizer}


def _serialise(obj, archive: str) -> bytearray:
    """torch.save's archive of `obj` (CPU tensors) in one buffer."""
    segments, size = plan_torch_file(obj, archive)
    blob = bytearray(size)
    base = ctypes.addressof(ctypes.c_char.from_buffer(blob)) if size else 0
    for seg in segments:
        if isinstance(seg.data, torch.Tensor):
            ctypes.memmove(base + seg.offset, seg.data.data_ptr(), seg.size)
        else:
            blob[seg.offset:seg.offset + seg.size] = seg.data
    return blob


def _write_pair(directory: str, stem: str, blob, record: dict) -> None:
    """`stem`.pt, then `stem`.json (the commit), each written under a temporary name and renamed."""
    for suffix, data in ((".pt", blob), (".json", json.dumps(record, sort_keys=True).encode())):
        tmp = os.path.join(directory, f".{stem}{suffix}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, stem + suffix))


def _read_intact(directory: str, stem: str) -> Tuple[Optional[dict], Optional[bytes], str]:
    """(record, file bytes, "") of an intact pair, else (None, None, why not)."""
    try:
        with open(os.path.join(directory, stem + ".json"), "rb") as f:
            record = json.loads(f.read())
        if not isinstance(record, dict) or record.get("checksum") != _record_checksum(record):
            return None, None, "its record fails its checksum"
        with open(os.path.join(directory, stem + ".pt"), "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        return None, None, f"unreadable ({e.__class__.__name__})"
    if len(data) != record.get("size") or zlib.crc32(data) != record.get("crc32"):
        return None, None, "its data fails the CRC-32 of its record"
    return record, data, ""


def _list(directory: str) -> List[Tuple[Optional[int], int]]:
    """(owner or None for this rank's own, iteration) of every committed record in `directory`."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)) if m.group(1) else None, int(m.group(2))))
    return found


class LocalSnapshot(SourceCheckpoint):
    """One rank's snapshot as a reader for the CheckpointManager's restore."""
    format = OWN_FORMAT   # the same state as a megatron_lite shard holds

    def __init__(self, path: str, iteration: int, metadata: dict, data: bytes):
        self.iter_dir, self.iteration, self.metadata = path, iteration, metadata
        self._state = unpickle_torch_file(memoryview(data))

    def model_state(self, model_cfg, tp, pp, tp_rank, pp_rank) -> Dict[str, torch.Tensor]:
        return self._state["model"]

    def scheduler_state(self):
        return self._state["opt_param_scheduler"], "loaded"

    def optimizer_state(self, run):
        return self._state["optimizer"], "loaded"

    def rng_state(self, state: ParallelState):
        return self._state["rng_state"], "restored"

    def fp8_state(self, state: ParallelState):
        return self._state.get("fp8_state"), None

    def release(self) -> None:
        self._state = {}


@dataclass
class LocalChoice:
    """What `decide` found: the iteration to resume from (None: none usable) and the report's lines."""
    iteration: Optional[int]
    source: Optional[LocalSnapshot]
    notes: List[str]


class LocalCheckpoints:
    """The run's in-memory snapshots (module docstring). Collective: every rank builds one."""

    def __init__(self, cfg: RunConfig, state: ParallelState):
        c = cfg.checkpoint
        self.cfg, self.state, self.interval = cfg, state, c.local_ckpt_interval
        self.root = local_root(cfg)
        self.directory = os.path.join(self.root, f"rank_{state.rank:05d}")
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--local-ckpt-dir: cannot create {self.directory} ({e.strerror}); pass a writable "
                              f"directory in node-local memory (default /dev/shm)") from None
        world, rank = state.world_size, state.rank
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        jump = c.replication_jump or (per_node if world > per_node else 1)
        self.send_to = (rank + jump) % world
        self.receive_from = (rank - jump) % world
        self.group = dist.new_group(backend="gloo") if state.is_distributed else None
        self._thread: Optional[threading.Thread] = None
        self._settled = threading.Event()
        self._error: Optional[BaseException] = None
        self._buffers: List[torch.Tensor] = []
        self.keep_iteration: Optional[int] = None   # the snapshot resumed from, until newer ones exist

    def due(self, iteration: int) -> bool:
        return bool(self.interval) and iteration % self.interval == 0

    # ----------------------------------------------------------------------------- saving

    def _capture(self, run) -> dict:
        """This rank's state, copied into CPU buffers reused from one snapshot to the next."""
        from megatron_lite.parallel.random import get_rng_state

        taken = [0]

        def buffer_for(t: torch.Tensor) -> torch.Tensor:
            i = taken[0]
            taken[0] += 1
            like = torch.empty_like(t, device="meta")
            if i == len(self._buffers) or self._buffers[i].shape != like.shape or self._buffers[i].dtype != t.dtype \
                    or self._buffers[i].stride() != like.stride():
                buf = torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device="cpu",
                                          pin_memory=t.device.type == "cuda")
                self._buffers[i:i + 1] = [buf]
            return self._buffers[i]

        fp8 = run.module.fp8_state
        state = {"iteration": run.progress.iteration, "model": run.module.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "opt_param_scheduler": run.scheduler.state_dict(),
                 "progress": run.progress.state_dict(), "rng_state": get_rng_state(run.state.rng),
                 "fp8_state": fp8.state_dict() if fp8 is not None else None}
        return saveable(state, "local snapshot", buffer_for=buffer_for)

    def snapshot(self, run) -> None:
        """Take iteration run.progress.iteration's snapshot; written and replicated in the background."""
        self.wait()
        iteration = run.progress.iteration
        payload = self._capture(run)
        done = None
        if any(b.is_pinned() for b in self._buffers):
            done = torch.cuda.Event()
            done.record()
        record = {"iteration": iteration, "owner": self.state.rank, "layout": _layout(self.cfg, self.state),
                  "mode": run.mode, "config": self.cfg.to_dict(), "progress": run.progress.state_dict(),
                  "weights_from": run.checkpoints.weights_from if run.checkpoints is not None else None}
        self._settled.clear()
        self._error = None
        self._thread = threading.Thread(target=self._write_and_replicate, args=(payload, record, done),
                                        name=f"local-snapshot-{iteration}", daemon=True)
        self._thread.start()

    def _write_and_replicate(self, payload: dict, record: dict, done) -> None:
        try:
            if done is not None:
                done.synchronize()
            iteration = record["iteration"]
            try:
                blob = _serialise(payload, _stem(iteration))
                record.update(size=len(blob), crc32=zlib.crc32(blob))
                record["checksum"] = _record_checksum(record)
                _write_pair(self.directory, _stem(iteration), blob, record)
                mine = record
            except Exception as e:   # (/dev/shm full): the other ranks still take part in the exchange
                blob, mine = None, {"iteration": iteration, "error": str(e)}
                self._error = e
            if self.group is not None:
                records = [None] * self.state.world_size
                dist.all_gather_object(records, mine, group=self.group)
                self._settled.set()
                self._exchange(blob, mine, records[self.receive_from])
            self._settled.set()
            if self._error is None:
                self._prune(iteration)
        except BaseException as e:
            self._error = e
            self._settled.set()

    def _exchange(self, blob, mine: dict, theirs: dict) -> None:
        """Send this rank's snapshot on, keep the one of the rank before."""
        if self.send_to == self.state.rank:
            return
        requests = []
        if "error" not in mine:
            requests.append(dist.isend(torch.frombuffer(blob, dtype=torch.uint8), self.send_to, group=self.group))
        incoming = None
        if "error" not in theirs:
            incoming = torch.empty(theirs["size"], dtype=torch.uint8)
            requests.append(dist.irecv(incoming, self.receive_from, group=self.group))
        for r in requests:
            r.wait()
        if incoming is not None:
            data = incoming.numpy().tobytes()
            if zlib.crc32(data) == theirs["crc32"]:
                _write_pair(self.directory, _stem(theirs["iteration"], self.receive_from), data, theirs)

    def _prune(self, iteration: int) -> None:
        """Keep the newest KEEP of own snapshots and of replicas (and the one resumed from until then)."""
        oldest = iteration - (KEEP - 1) * self.interval
        for owner, it in _list(self.directory):
            if it < oldest and it != self.keep_iteration:
                self._remove(_stem(it, owner))
        if self.keep_iteration is not None and self.keep_iteration < oldest:
            self._remove(_stem(self.keep_iteration))
            self.keep_iteration = None

    def _remove(self, stem: str) -> None:
        for suffix in (".json", ".pt"):   # the record first: a pair without it is not a snapshot
            try:
                os.remove(os.path.join(self.directory, stem + suffix))
            except FileNotFoundError:
                pass

    def wait_settled(self) -> None:
        """Until every rank's own file of the snapshot in flight is written (or it failed)."""
        if self._thread is not None:
            self._settled.wait()

    def wait(self) -> None:
        """Until the snapshot in flight is written and replicated; a failure is said, and training goes on."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            print(f"[rank {self.state.rank}] local snapshot not written: {self._error}; training goes on "
                  f"(persistent checkpoints are unaffected)", flush=True)
            self._error = None

    def discard(self) -> None:
        """The run ended with a persistent checkpoint of its last iteration: drop the snapshots."""
        self.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ----------------------------------------------------------------------------- loading

    def decide(self, persistent_iteration, persistent_is_own: bool, usable: bool = True) -> LocalChoice:
        """Collective: the newest iteration every rank's snapshot survives at, if it beats the
        persistent checkpoint (`persistent_iteration` of --save when `persistent_is_own`, else one
        of another run) and the run may resume from snapshots at all (`usable`: not with
        --ckpt-step); brings each rank its file; removes the snapshots not used."""
        cfg, state = self.cfg, self.state
        from megatron_lite.checkpoint.decision import requested_mode

        layout, mode = _layout(cfg, state), requested_mode(cfg)
        held, notes, other = {}, [], set()
        for owner, it in _list(self.directory):
            record, _, why = _read_intact(self.directory, _stem(it, owner))
            who = state.rank if owner is None else owner
            if record is None:
                notes.append(f"rank {state.rank}'s {_stem(it, owner)}: {why}")
            elif record.get("layout") != layout or record.get("mode") != mode:
                other.add((it, json.dumps(record.get("layout")), record.get("mode")))
            else:
                held[(who, it)] = owner is None
        everyone = all_gather_object((held, notes, sorted(other)), state)
        copies: Dict[int, Dict[int, List[Tuple[int, bool]]]] = {}   # iteration -> owner -> [(holder, own)]
        notes, other = [], set()
        for holder, (h, n, o) in enumerate(everyone):
            notes += n
            other.update(tuple(x) for x in o)
            for (owner, it), own in h.items():
                copies.setdefault(it, {}).setdefault(owner, []).append((holder, own))
        complete = sorted((it for it, owners in copies.items() if len(owners) == state.world_size), reverse=True)
        newest = complete[0] if complete else None
        if other:
            notes.append(f"{len(other)} snapshot(s) of another layout or mode ({sorted(other)[0][2]} at "
                         f"{sorted(other)[0][1]}): not used")
        use = usable and newest is not None and (not persistent_is_own or persistent_iteration is None
                                      or not isinstance(persistent_iteration, int) or newest > persistent_iteration)
        if newest is not None and not usable:
            notes.append(f"local snapshots up to iteration {newest}: not used (a chosen --ckpt-step, or a start "
                         f"from scratch), removed")
        elif newest is not None and not use:
            notes.append(f"local snapshots up to iteration {newest}: not newer than the persistent checkpoint")
        source = None
        if use:
            source = self._bring_home(newest, copies[newest], notes)
            self.keep_iteration = newest
        self._remove_all_but(newest if use else None)
        return LocalChoice(newest if use else None, source, notes)

    def _bring_home(self, iteration: int, owners: Dict[int, List[Tuple[int, bool]]], notes: List[str]) -> LocalSnapshot:
        """Every rank's own snapshot of `iteration` in its directory (sent by a holder of a replica where
        it lost its own), read and opened."""
        rank = self.state.rank
        for owner in range(self.state.world_size):
            holders = owners[owner]
            if any(own for _, own in holders):
                continue
            holder = min(h for h, _ in holders)
            notes.append(f"rank {owner}'s snapshot of iteration {iteration}: from its replica on rank {holder}")
            if rank == holder:
                record, data, _ = _read_intact(self.directory, _stem(iteration, owner))
                self._send_bytes(data, owner)
                self._send_bytes(json.dumps(record, sort_keys=True).encode(), owner)
            elif rank == owner:
                data = self._recv_bytes(holder)
                record = json.loads(self._recv_bytes(holder))
                _write_pair(self.directory, _stem(iteration), data, record)
        record, data, why = _read_intact(self.directory, _stem(iteration))
        if record is None:
            raise ConfigError(f"local snapshot {os.path.join(self.directory, _stem(iteration))}: {why} while it "
                              f"was being loaded; remove {self.root} to resume from the persistent checkpoint")
        return LocalSnapshot(os.path.join(self.directory, _stem(iteration) + ".pt"), iteration, record, data)

    def _send_bytes(self, data: bytes, to: int) -> None:
        dist.send(torch.tensor([len(data)], dtype=torch.int64), to, group=self.group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), to, group=self.group)

    def _recv_bytes(self, source: int) -> bytes:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, source, group=self.group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, source, group=self.group)
        return data.numpy().tobytes()

    def _remove_all_but(self, iteration: Optional[int]) -> None:
        for owner, it in _list(self.directory):
            if it != iteration:
                self._remove(_stem(it, owner))
