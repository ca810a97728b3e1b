"""The streaming engine: read a block of rows, apply the deltas, write it, hash both sides.

Work flows through five stages, each a function of one block: read (base rows and the rows of
each step's inputs into a slot's reused buffers), check (hash the base rows read; compare base
tensors against the publisher's digests), compute (the kinds' steps), write (the rows, with their
tensor and row range, to the writer the sink opened for the shard) and seal (hash the rows
written). On a verified run the check stage also checks the deltas: it hashes the input rows
just read and compares each delta tensor with its manifest (format 2), or feeds whole-file digests
from them (format 1). make-delta adds one after the write that hashes the shard files it writes;
a sink that converts the rows (GGUF, Meta's layout) adds one after the seal hashing the bytes it
wrote, so the result's digests are of the tensors as written, and a sink whose format records
checksums of its own (the CRC-32s of Meta's zip archives) one before that, so the writing thread
only writes. Each byte is hashed once per digest
it is part of, from the buffer it is already in. With ``workers == 1`` the stages run one after
the other in this thread; otherwise each stage is a thread and blocks pass between them through
bounded queues, so reading, hashing, arithmetic and writing overlap. Slots bound the memory: at
most ``slots`` blocks are in flight, whatever the model's size.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import faults
from ..errors import DeltaMergeError, VerificationError, WorkError
from ..integrity.digest import (
    DEFAULT_ALGORITHM,
    BytesHasher,
    FileHasher,
    Hash,
    TensorDigest,
    TensorHasher,
    new_hash,
    raw_bytes,
)
from ..integrity.manifest import delta_mismatch
from ..kinds import RowInput, Scratch
from ..sinks import ShardWriter, Sink, Written
from ..sources.checkpoint import Checkpoint, view_rows
from .plan import Shard, TensorJob
from .workers import run_threads

Progress = Callable[[int], None]
ShardDone = Callable[[str, int, dict[str, TensorDigest], dict[str, TensorDigest]], None]


@dataclass
class Slot:
    """The buffers of one block in flight, reused block after block."""

    capacity: int
    base: torch.Tensor = field(init=False)
    out: torch.Tensor = field(init=False)
    inputs: list[torch.Tensor] = field(default_factory=list)
    kept: Scratch = field(default_factory=Scratch)

    def __post_init__(self) -> None:
        self.base = torch.empty(self.capacity, dtype=torch.uint8)
        self.out = torch.empty(self.capacity, dtype=torch.uint8)

    def input_buffer(self, i: int) -> torch.Tensor:
        while len(self.inputs) <= i:
            self.inputs.append(torch.empty(self.capacity, dtype=torch.uint8))
        return self.inputs[i]


@dataclass
class Block:
    shard: int
    job: TensorJob
    r0: int
    r1: int
    first_in_shard: bool
    last_in_shard: bool
    slot: Slot | None = None
    base_rows: torch.Tensor | None = None
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    located: list[tuple[tuple[Path, int] | None, torch.Tensor]] = field(default_factory=list)
    read_inputs: list[tuple[RowInput, int, torch.Tensor]] = field(default_factory=list)
    out: torch.Tensor | None = None
    written: list[Written] = field(default_factory=list)

    @property
    def first(self) -> bool:
        return self.r0 == 0

    @property
    def last(self) -> bool:
        return self.r1 >= self.job.out.rows


@dataclass(frozen=True)
class WrittenFile:
    """A shard make-delta wrote: its digest, and its header's length and digest."""

    digest: str
    header_size: int
    header_digest: str


@dataclass
class EngineResult:
    base_digests: dict[str, TensorDigest]
    out_digests: dict[str, TensorDigest]  # the plan's tensors, as computed
    file_digests: dict[Path, str]
    input_digests: dict[tuple[Checkpoint, str], TensorDigest]  # delta tensors checked as read
    bytes_read: int
    bytes_written: int
    seconds: float
    written_digests: dict[str, TensorDigest] = field(default_factory=dict)  # a converting sink's


class Engine:
    """Runs a plan: ``shards`` of jobs over ``base``, written by ``sink`` into ``out_dir``.

    The sink is the only thing that knows the result's file format: the engine opens one
    writer per shard through it and hands it each block's rows in plan order. ``on_shard_done``
    is told each finished shard (name, size on disk, its tensors' digests and, for a converting
    sink, the digests of what it wrote for them) once its bytes are durable and hashed.
    """

    def __init__(
        self,
        base: Checkpoint | None,
        shards: list[Shard],
        out_dir: Path,
        *,
        sink: Sink,
        block_bytes: int,
        workers: int = 1,
        hash_base: bool = False,
        hash_out: bool = True,
        base_algorithm: str = DEFAULT_ALGORITHM,
        out_algorithm: str = DEFAULT_ALGORITHM,
        expected_base: dict[str, TensorDigest] | None = None,
        expected_inputs: dict[Checkpoint, dict[str, TensorDigest]] | None = None,
        file_hashers: dict[Path, FileHasher] | None = None,
        progress: Progress | None = None,
        at: Callable[[str], None] | None = None,
        slots: int | None = None,
        hash_files: bool = False,
        skip_shards: set[str] | None = None,
        on_shard_done: ShardDone | None = None,
    ):
        self.base = base
        self.shards = shards
        self.out_dir = out_dir
        self.sink = sink
        self.block_bytes = block_bytes
        self.workers = max(1, workers)
        self.hash_base = hash_base or expected_base is not None
        self.hash_out = hash_out
        self.base_algorithm = base_algorithm
        self.out_algorithm = out_algorithm
        self.expected_base = expected_base
        self.expected_inputs = expected_inputs or {}
        self.file_hashers = file_hashers or {}
        self.progress = progress
        self.at = at  # told "shard: tensor" as each tensor starts to be written, for the bar
        self.hash_files = hash_files
        self.skip_shards = skip_shards or set()
        self.on_shard_done = on_shard_done
        self.written_files: dict[str, WrittenFile] = {}
        self._file_hasher: Hash = new_hash()
        self._header: tuple[int, str] = (0, "")
        self.n_slots = slots or (1 if self.workers == 1 else 3)
        self.base_digests: dict[str, TensorDigest] = {}
        self.out_digests: dict[str, TensorDigest] = {}
        self._base_hashers: dict[str, TensorHasher] = {}
        self._out_hashers: dict[str, TensorHasher] = {}
        self._input_hashers: dict[tuple[Checkpoint, str], TensorHasher] = {}
        self.input_digests: dict[tuple[Checkpoint, str], TensorDigest] = {}
        self._writer: ShardWriter | None = None
        self._sizes: dict[str, int] = {}
        self.written_digests: dict[str, TensorDigest] = {}
        self._written_hashers: dict[str, BytesHasher] = {}
        self._written_names: dict[str, list[str]] = {}
        self._scratch = Scratch()
        self._matched = 0
        self.bytes_read = 0
        self.bytes_written = 0

    # -- the blocks, in output order -------------------------------------------------------
    def _blocks(self) -> Iterator[Block]:
        for s, shard in enumerate(self.shards):
            if shard.filename in self.skip_shards:
                continue
            pairs = [(job, r) for job in shard.jobs for r in job.blocks()]
            if not pairs:
                continue
            for i, (job, (r0, r1)) in enumerate(pairs):
                yield Block(s, job, r0, r1, i == 0, i == len(pairs) - 1)

    def _capacity(self) -> int:
        """A slot's buffer size: the largest block any job reads or writes. A tensor of no rows
        reads and writes none, whatever the size of a row: it is not sized from the row."""
        largest = 1
        for shard in self.shards:
            for job in shard.jobs:
                rows = min(job.rows_per_block, job.out.rows)
                specs = [job.out] + ([job.base] if job.base else [])
                specs += [i.spec for step in job.steps for i in step.inputs]
                for spec in specs:
                    largest = max(largest, rows * spec.row_numel * spec.dtype.itemsize)
        return largest

    # -- stages ----------------------------------------------------------------------------
    def _read(self, b: Block) -> None:
        job, slot = b.job, b.slot
        assert slot is not None
        n = max(0, min(b.r1, job.base_rows) - b.r0)
        if b.r0 == 0 and job.steps and job.steps[0].first_pass:
            self._first_pass(job, slot.base)
        if job.base is not None and self.base is not None:
            b.base_rows = self.base.read_rows(job.base.name, b.r0, b.r0 + n, slot.base)
            self.bytes_read += b.base_rows.nbytes
        k = 0
        b.inputs = []
        b.located = []
        b.read_inputs = []
        for step in job.steps:
            rows = []
            for inp in step.inputs:
                m = max(0, min(b.r1, inp.spec.rows) - b.r0)
                t = inp.checkpoint.read_rows(inp.name, b.r0, b.r0 + m, slot.input_buffer(k))
                self.bytes_read += t.nbytes
                rows.append(t)
                if inp.checkpoint in self.expected_inputs:
                    b.read_inputs.append((inp, b.r0 + m, t))
                if self.file_hashers:
                    b.located.append((inp.checkpoint.locate(inp.name, b.r0, b.r0 + m), t))
                k += 1
            b.inputs.append(rows)
        if b.r1 < job.out.rows and job.base is not None and self.base is not None:
            nxt = min(job.base_rows, b.r1 + job.rows_per_block)
            if nxt > b.r1:
                self.base.prefetch(job.base.name, b.r1, nxt)

    def _first_pass(self, job: TensorJob, buffer: torch.Tensor) -> None:
        """Every row of the base tensor, in the job's blocks, for a step that needs them all
        before its first block; read here, where the base's reader lives, into the slot's buffer
        before the first block's rows."""
        assert job.base is not None and self.base is not None, "planned without a base tensor"
        step = job.steps[0]
        for r0, r1 in job.blocks():
            rows = self.base.read_rows(job.base.name, r0, min(r1, job.base_rows), buffer)
            self.bytes_read += rows.nbytes
            step.feed(rows, r0)
        step.end_first_pass()

    def _check_inputs(self, b: Block) -> None:
        """Check the delta rows just read: each delta tensor against its manifest's digest
        (format 2), and whole-file digests fed from the same rows (format 1). It runs in the
        check stage's thread, before the base's check: as a stage of its own on two cores it was
        slower (verified apply, 7B bench, three pairs: 17.88 s median against 17.27 s)."""
        for inp, until, rows in b.read_inputs:
            key = (inp.checkpoint, inp.name)
            if key in self.input_digests:
                continue  # rows past the end of this input: nothing of it in this block
            # Every tensor of a checked delta is in its manifest (delta_checks._check_table).
            expected = self.expected_inputs[inp.checkpoint][inp.name]
            hasher = self._input_hashers.get(key)
            if hasher is None:
                hasher = self._input_hashers[key] = TensorHasher(inp.spec, expected.algorithm)
            hasher.update(rows)
            if until >= inp.spec.rows:
                digest = self.input_digests[key] = self._input_hashers.pop(key).digest()
                if expected != digest:
                    raise delta_mismatch(inp.checkpoint.file_of(inp.name), inp.name, digest, expected)
        for where, rows in b.located:
            if where is not None and where[0] in self.file_hashers:
                self.file_hashers[where[0]].feed(where[1], raw_bytes(rows))

    def _checks(self, b: Block) -> None:
        self._check_inputs(b)
        self._check(b)

    def _check(self, b: Block) -> None:
        job = b.job
        if not self.hash_base or job.base is None or b.base_rows is None:
            return
        if b.r0 > 0 and b.r0 >= job.base_rows:
            return  # rows beyond the base's: nothing of the base in this block
        hasher = self._base_hashers.get(job.base.name)
        if hasher is None:
            hasher = self._base_hashers[job.base.name] = TensorHasher(job.base, self.base_algorithm)
        hasher.update(b.base_rows)
        if min(b.r1, job.base_rows) >= job.base_rows or b.last:
            digest = hasher.digest()
            del self._base_hashers[job.base.name]
            self.base_digests[job.base.name] = digest
            self._compare_base(job.base.name, digest)

    def _compare_base(self, name: str, digest: TensorDigest) -> None:
        if self.expected_base is None:
            return
        expected = self.expected_base.get(name)
        where = self.base.file_of(name) if self.base is not None else name
        if expected is None:
            raise VerificationError(
                f"{where}: tensor {name!r} is not in the manifest's base: this is not the base "
                f"the delta was made against ({self._matched} tensors had matched)"
            )
        if expected != digest:
            raise VerificationError(
                f"{where}: tensor {name!r} does not match the publisher's base: "
                f"{digest.describe()}, expected {expected.describe()} "
                f"({self._matched} tensors had matched)"
            )
        self._matched += 1

    def _compute(self, b: Block) -> None:
        job, slot = b.job, b.slot
        assert slot is not None
        out = view_rows(slot.out, job.out, b.r1 - b.r0)
        if job.out.shape == ():
            out = out.reshape(())
        cur = b.base_rows
        if not job.steps:
            assert cur is not None
            out.copy_(cur.reshape(out.shape))
        for k, step in enumerate(job.steps):
            n = max(0, min(b.r1, step.after.rows) - b.r0)
            shape = (n, *step.after.shape[1:]) if step.after.shape else ()
            cur = self._extend(cur, job, b.r0, n, shape)
            last = k == len(job.steps) - 1
            target = out if last else self._scratch.get(f"step{k % 2}", step.after.dtype, shape)
            step.apply(cur, b.inputs[k], b.r0, target, self._scratch)
            cur = target
        b.out = out

    def _extend(
        self, cur: torch.Tensor | None, job: TensorJob, r0: int, n: int, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Rows the tensor does not have yet start at zero, or at the mean of the base's rows."""
        have = 0 if cur is None else (cur.shape[0] if cur.dim() else 1)
        if cur is not None and have >= n:
            return cur if not shape else cur[:n]
        ext = self._scratch.get("extend", torch.float32, shape)
        if cur is not None and have:
            ext[:have].copy_(cur)
        if job.fill == "mean" and job.mean is not None:
            ext[have:].copy_(job.mean.expand_as(ext[have:]))
        else:
            ext[have:].zero_()
        return ext

    def _write(self, b: Block) -> None:
        shard = self.shards[b.shard]
        if b.first and self.at is not None:
            self.at(f"{shard.filename}: {b.job.name}")
        if b.first_in_shard:
            self._writer = self.sink.open_shard(self.out_dir, shard)
            faults.reached("header")
        assert self._writer is not None and b.out is not None
        rows = b.out.contiguous()
        kept = b.slot.kept if b.slot is not None else self._scratch

        def buffer(n: int) -> torch.Tensor:
            return kept.get("written", torch.uint8, (n,))

        try:
            b.written = self._writer.write_block(b.job.out, b.r0, b.r1, rows, buffer)
        except OSError as exc:
            what = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise WorkError(f"{self._writer.path}: {what} while writing tensor {b.job.name!r}") from None
        if self.sink.converts:
            self.bytes_written += sum(w.size for w in b.written)
        else:
            self.bytes_written += rows.nbytes
        faults.reached("block")
        if b.last_in_shard:
            writer, self._writer = self._writer, None
            writer.close()
            self._sizes[shard.filename] = writer.size
        if self.progress is not None:
            self.progress(rows.nbytes)

    def _hash_files_written(self, b: Block) -> None:
        """make-delta: the digest of each shard file it writes, and of the file's header."""
        shard = self.shards[b.shard]
        if b.out is None:
            return
        if b.first_in_shard:
            prefix = self.sink.file_prefix(shard.specs)
            self._file_hasher = new_hash(DEFAULT_ALGORITHM, prefix)
            self._header = (len(prefix), self._file_hasher.copy().hexdigest())
        self._file_hasher.update(raw_bytes(b.out))
        if b.last_in_shard:
            self.written_files[shard.filename] = WrittenFile(
                self._file_hasher.hexdigest(), *self._header
            )

    def _seal(self, b: Block) -> None:
        """Hash the tensors written, off the writer, and close a tensor's steps after its last block."""
        job = b.job
        if self.hash_out and b.out is not None:
            hasher = self._out_hashers.get(job.name)
            if hasher is None:
                hasher = self._out_hashers[job.name] = TensorHasher(job.out, self.out_algorithm)
            hasher.update(b.out)
            if b.last:
                self.out_digests[job.name] = self._out_hashers.pop(job.name).digest()
        if b.last:
            for step in job.steps:
                step.close()
        if not self.sink.converts:
            self._shard_done(b)

    def _checksum_written(self, b: Block) -> None:
        """The checksums the output format records of the bytes just written, off the writer."""
        self.sink.checksum(b.written)

    def _hash_written(self, b: Block) -> None:
        """Hash the bytes a converting sink wrote, tensor by tensor as the output holds them.

        A tensor written as the rows' own bytes (``Written.same_as_rows``) has the digest the seal
        computed of those rows, so it is not hashed twice."""
        names = self._written_names.setdefault(b.job.name, [])
        for w in b.written:
            hasher = self._written_hashers.get(w.name)
            if hasher is None:
                hasher = self._written_hashers[w.name] = BytesHasher(
                    w.name, w.dtype, w.shape, w.nbytes, self.out_algorithm
                )
                names.append(w.name)
            if w.same_as_rows and self.hash_out:
                hasher.skip(w.offset, w.data)
            else:
                hasher.update(w.offset, w.data)
            if hasher.done:
                hasher = self._written_hashers.pop(w.name)
                if hasher.skipped:
                    rows = self.out_digests[b.job.name]  # sealed already: this block's seal ran first
                    self.written_digests[w.name] = TensorDigest(
                        w.dtype, w.shape, rows.hexdigest, rows.algorithm
                    )
                else:
                    self.written_digests[w.name] = hasher.digest()
        b.written = []
        if b.last:
            short = [n for n in names if n not in self.written_digests]
            if short:
                raise WorkError(f"internal error: tensor {b.job.name!r}: {short[0]} not wholly written")
        self._shard_done(b)

    def _shard_done(self, b: Block) -> None:
        """The shard's last block has passed every stage: tell the journal."""
        if not b.last_in_shard or self.on_shard_done is None:
            return
        shard = self.shards[b.shard]
        digests = {j.name: self.out_digests[j.name] for j in shard.jobs if j.name in self.out_digests}
        written = {
            n: self.written_digests[n] for j in shard.jobs for n in self._written_names.get(j.name, ())
        }
        self.on_shard_done(shard.filename, self._sizes.pop(shard.filename), digests, written)
        faults.reached("shard")

    # -- running ---------------------------------------------------------------------------
    def run(self) -> EngineResult:
        start = time.monotonic()
        capacity = self._capacity()
        stages = [self._read, self._check, self._compute, self._write, self._seal]
        if self.expected_inputs or self.file_hashers:
            stages[1] = self._checks
        if self.hash_files:
            stages.insert(-1, self._hash_files_written)
        if self.sink.checksums:
            stages.append(self._checksum_written)
        if self.sink.converts:
            stages.append(self._hash_written)
        torch_threads = torch.get_num_threads()
        if self.workers > 1:
            # The stages are the parallelism: torch's own worker threads spin after each op and
            # take the cores the hashing threads need (measured: make-delta 18 s -> 16 s).
            torch.set_num_threads(1)
        try:
            if self.workers == 1:
                slot = Slot(capacity)
                for b in self._blocks():
                    b.slot = slot
                    for stage in stages:
                        _named(stage, b)
            else:
                _run_threads(self._blocks(), stages, [Slot(capacity) for _ in range(self.n_slots)])
        finally:
            torch.set_num_threads(torch_threads)
            if self._writer is not None:
                self._writer.abort()
                self._writer = None
        files = {path: h.finish() for path, h in self.file_hashers.items()}
        return EngineResult(
            self.base_digests, self.out_digests, files, dict(self.input_digests),
            self.bytes_read, self.bytes_written, time.monotonic() - start, self.written_digests,
        )


def _named(stage: Callable[[Block], None], b: Block) -> None:
    """Run a stage; an unexpected exception becomes a one-line error naming the tensor."""
    try:
        stage(b)
    except DeltaMergeError:
        raise
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise WorkError(f"{exc.filename or 'I/O'}: {what} (tensor {b.job.name!r})") from exc
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkError(f"tensor {b.job.name!r}: {first}") from exc


_DONE = object()


def _run_threads(
    blocks: Iterator[Block], stages: list[Callable[[Block], None]], slots: list[Slot]
) -> None:
    """Each stage in its own thread, joined by bounded queues; the first error stops them all."""
    free: queue.Queue[Slot] = queue.Queue()
    for slot in slots:
        free.put(slot)
    links: list[queue.Queue] = [queue.Queue(maxsize=len(slots)) for _ in stages]
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue) -> object:
        while not stop.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue
        return _DONE

    def feeder() -> None:
        try:
            for b in blocks:
                slot = get(free)
                if slot is _DONE:
                    return
                b.slot = slot  # type: ignore[assignment]
                if not put(links[0], b):
                    return
            put(links[0], _DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            stop.set()

    def worker(i: int) -> None:
        try:
            while True:
                b = get(links[i])
                if b is _DONE:
                    if i + 1 < len(stages):
                        put(links[i + 1], _DONE)
                    return
                _named(stages[i], b)  # type: ignore[arg-type]
                if i + 1 < len(stages):
                    if not put(links[i + 1], b):
                        return
                else:
                    free.put(b.slot)  # type: ignore[union-attr]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            stop.set()

    bodies = [("feed", feeder)] + [(s.__name__, lambda i=i: worker(i)) for i, s in enumerate(stages)]
    run_threads(bodies, stop)
    if errors:
        raise errors[0]
