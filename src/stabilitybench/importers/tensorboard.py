"""TensorBoard event folders (HF Trainer, Lightning's TensorBoardLogger, SB3, SummaryWriter).

Read with TensorBoard's own record loader (`RawEventFileLoader`) and `Event` protobuf, streamed
one event at a time — not `EventAccumulator`, whose default size guidance keeps a random sample
of 1,000 scalars per tag. Each folder that holds event files is one run (TensorBoard's notion
of a run); its files are read in name order (their names start with the creation time).
A file's records are framed (length, CRC, data, CRC), so the bytes the loader consumed tell
exactly where a truncated or corrupt record stopped it: what was readable is imported and the
rest is reported.

Without TensorFlow, TensorBoard's loader checks each record's CRC-32C in pure Python, which is
~80% of the read time; where `google-crc32c` (the `import` extra) is installed, its C CRC-32C
(the same checksum) stands in for the pure-Python one while the import reads.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stabilitybench.errors import StabilityBenchError
from stabilitybench.importers.points import Advance, PointWriter, ReadNotes

EVENT_GLOB = "*tfevents*"
RECORD_OVERHEAD = 16  # uint64 length + uint32 length CRC + uint32 data CRC around each record
PROGRESS_EVERY = 1 << 20  # report progress every ~1 MB read
TENSORBOARD_MODULES = (
    "tensorboard.backend.event_processing.event_file_loader",
    "tensorboard.compat.proto.event_pb2",
    "tensorboard.util.tensor_util",
)


@contextmanager
def fast_crc32c() -> Iterator[None]:
    """Swap the stub reader's pure-Python CRC-32C for google-crc32c's C one, if installed."""
    try:
        import google_crc32c
        from tensorboard.compat import tf
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    except ImportError:
        yield
        return
    if tf.__version__ != "stub" or google_crc32c.implementation != "c":
        yield  # TensorFlow's own reader is already native
        return
    original = pywrap_tensorflow.crc32c
    pywrap_tensorflow.crc32c = google_crc32c.value
    try:
        yield
    finally:
        pywrap_tensorflow.crc32c = original


def event_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if "tfevents" in root.name else []
    return sorted(p for p in root.rglob(EVENT_GLOB) if p.is_file())


@dataclass
class TensorBoardRun:
    """The event files of one folder."""

    label: str
    files: list[Path]

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def read(self, points: PointWriter, advance: Advance) -> list[str]:
        with fast_crc32c():
            return self._read(points, advance)

    def _read(self, points: PointWriter, advance: Advance) -> list[str]:
        """Every file's scalars into `points`, in name order; returns what was skipped."""
        _require_tensorboard()
        notes = ReadNotes()
        non_scalar: set[str] = set()
        for path in self.files:
            _read_file(path, points, advance, notes, non_scalar)
        if non_scalar:
            shown = ", ".join(sorted(non_scalar)[:5]) + (" …" if len(non_scalar) > 5 else "")
            notes.add(f"{len(non_scalar)} non-scalar tag(s) skipped (text, histograms): {shown}")
        return notes.lines


def _require_tensorboard() -> None:
    """Before any file is read: the modules the reader uses import, or an install hint."""
    try:
        for module in TENSORBOARD_MODULES:
            importlib.import_module(module)
    except ImportError:
        raise StabilityBenchError(
            "reading TensorBoard logs needs tensorboard; install it with "
            "pip install 'stabilitybench[import]'"
        ) from None


def _read_file(
    path: Path, points: PointWriter, advance: Advance, notes: ReadNotes, non_scalar: set[str]
) -> None:
    """Add one event file's scalars to `points`, reporting bytes read to `advance`; what could
    not be read goes to `notes`, tags that are not scalars to `non_scalar`."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    size = path.stat().st_size
    consumed = reported = events = 0
    try:
        loader = RawEventFileLoader(str(path))
    except Exception as exc:  # the loader's own open error, said once per file
        notes.add(f"{path.name}: could not be opened ({exc}); skipped")
        advance(size)
        return
    for record in loader.Load():
        consumed += len(record) + RECORD_OVERHEAD
        events += 1
        if consumed - reported >= PROGRESS_EVERY:
            advance(consumed - reported)
            reported = consumed
        try:
            event = event_pb2.Event.FromString(record)
        except Exception:
            notes.add(f"{path.name}: an event that is not a valid Event record; skipped")
            continue
        if event.HasField("summary"):
            _add_summary(event, points, non_scalar)
    advance(size - reported)
    if consumed < size:
        notes.add(
            f"{path.name}: {events:,} events read; the {size - consumed:,} bytes from byte "
            f"{consumed:,} on are a truncated or corrupt record and were skipped"
        )


def _add_summary(event: Any, points: PointWriter, non_scalar: set[str]) -> None:
    """Add an Event's scalar summary values to `points` at its step; name the others in
    `non_scalar` (histograms, images, audio, text, tensors of more than one value)."""
    from tensorboard.util import tensor_util

    step = int(event.step)
    for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            points.add(step, value.tag, float(value.simple_value))
        elif kind == "tensor":
            try:
                array = tensor_util.make_ndarray(value.tensor)
            except Exception:
                array = None
            if array is not None and array.size == 1 and array.dtype.kind in "fiub":
                points.add(step, value.tag, float(array.reshape(())))
            else:
                non_scalar.add(value.tag)
        else:  # histograms, images, audio: not a per-step scalar
            non_scalar.add(value.tag)


def discover(root: Path) -> list[TensorBoardRun]:
    """One run per folder holding event files; the label is the folder relative to `root`."""
    groups: dict[Path, list[Path]] = {}
    for path in event_files(root):
        groups.setdefault(path.parent, []).append(path)
    base = root if root.is_dir() else root.parent
    runs = []
    for folder in sorted(groups):
        label = os.path.relpath(folder, base).replace(os.sep, "/")
        runs.append(TensorBoardRun(label=label, files=sorted(groups[folder])))
    return runs
