"""TensorBoard scalars for a run (the optional extra `.[tensorboard]`, which brings tensorboardX).

TensorBoardWriter is a callback (hpcfl.train(..., callbacks=[writer])): each epoch (dp) or
round (fl) record becomes one scalar per numeric field, at global step = the epoch or round.
read_scalars reads the event files back without the writer's code, for tests and scripts.
"""
from __future__ import annotations

import math
import numbers
import struct
from pathlib import Path

from ..errors import DataError, UsageError

# The record key that numbers the records, per mode (dp.py and fl.py write them).
STEP_KEYS = {"dp": "epoch", "fl": "round"}

# Known keys -> tags, grouped so that TensorBoard shows one section per concern. The two modes'
# per-record wall times share time/seconds so that dp and fl runs overlay in one chart.
TAGS = {
    "test_accuracy": "accuracy/test",
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "epoch_seconds": "time/seconds",
    "round_seconds": "time/seconds",
    "gather_seconds": "time/gather_seconds",
    "aggregate_seconds": "time/aggregate_seconds",
    "samples_per_second": "throughput/samples_per_second",
    "gflops_per_rank": "throughput/gflops_per_rank",
    "bytes_to_server": "traffic/bytes_to_server",
    "bytes_from_server": "traffic/bytes_from_server",
    "aggregate_memory_bytes": "memory/aggregate_bytes",
    "step": "progress/step",                 # dp: optimizer steps so far
    "ranks": "run/ranks",
    "clients": "clients/sampled",
    "dropped": "clients/dropped",
    "rejected": "clients/rejected",
    "stragglers": "clients/stragglers",
    "secagg_seconds": "secagg/total_seconds",
    "secagg_stages": "secagg",               # a dict of stage -> seconds: secagg/keys, ...
    "server_attack": "attack/server",        # a dict; only its numeric fields are kept
}

# Families of keys that later features extend (dp_epsilon, dp_noise...): matched by prefix so
# that a new key of the family lands in its section without a change here.
PREFIXES = (("dp_", "privacy/dp_"), ("secagg_", "secagg/"))


def tag_for(key: str) -> str:
    """The tag of a top-level record key: the table, then a family prefix, else other/<key>,
    so that a key nobody listed is still written, never dropped."""
    if key in TAGS:
        return TAGS[key]
    for prefix, section in PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return section + key[len(prefix):]
    return f"other/{key}"


def is_scalar(value) -> bool:
    """A finite int or float (numpy's included). bool is an int to Python but a flag to a
    reader, so it is left out; numpy's bool_ is not a numbers.Real, so it is too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError):     # an int too large for a float
        return False


def scalars(rec: dict, step_key: str | None = None) -> dict[str, float]:
    """tag -> value for every scalar of a record, nested dicts flattened as tag/subkey. The step
    key itself is the x axis, not a series."""
    out: dict[str, float] = {}

    def put(tag: str, value, fallback: str) -> None:
        if isinstance(value, dict):
            for sub, v in value.items():
                put(f"{tag}/{sub}", v, f"{fallback}/{sub}")
        elif is_scalar(value):
            # two keys mapped to one tag (a dp and an fl key in one record): keep both
            out[fallback if tag in out else tag] = float(value)

    for key, value in rec.items():
        if key != step_key:
            put(tag_for(str(key)), value, f"other/{key}")
    return out


def step_key_of(rec: dict) -> str | None:
    key = STEP_KEYS.get(str(rec.get("mode")))
    if key in rec:
        return key
    return next((k for k in STEP_KEYS.values() if k in rec), None)   # a record without "mode"


class TensorBoardWriter:
    """A callback that writes each record's scalars to an event file in `logdir`.

    with TensorBoardWriter("runs/a") as tb:
        hpcfl.train(cfg, callbacks=[tb])

    Rank 0 only (the Reporter calls callbacks there alone). close() may be called more than once.
    """

    # TensorBoard re-reads event files every few seconds: flush that often, not every 2 minutes
    # (tensorboardX's default), so that a running job shows up live; a flush per record would
    # fsync once per round, which fast fl rounds do not need.
    FLUSH_SECS = 10

    def __init__(self, logdir: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs tensorboardX: pip install -e '.[tensorboard]'") from None
        self.logdir = str(logdir)
        self._writer = None
        try:                                     # creates the folder and opens the event file now
            self._writer = SummaryWriter(logdir=self.logdir, flush_secs=self.FLUSH_SECS)
        except OSError as exc:
            raise UsageError(f"--tensorboard {self.logdir}: cannot write there ({exc.strerror or exc})") from None
        self._last_step = 0

    def __call__(self, rec: dict) -> None:
        if self._writer is None:
            # SummaryWriter would silently open a new event file after close()
            raise ValueError(f"TensorBoardWriter({self.logdir!r}) is closed")
        key = step_key_of(rec)
        step = rec.get(key) if key else None
        if not (isinstance(step, numbers.Integral) and not isinstance(step, bool)):
            step = self._last_step + 1           # no epoch/round: number the records ourselves
        self._last_step = int(step)
        for tag, value in scalars(rec, key).items():
            self._writer.add_scalar(tag, value, global_step=self._last_step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls do nothing."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()                       # flushes first

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading event files back -------------------------------------------------------------

_MASK_DELTA = 0xA282EAD8


def _crc32c():
    """tensorboardX's CRC-32C (the native `crc32c` package when installed, else its pure-Python
    table); None if it moved, and then read_scalars checks no CRC."""
    try:
        from tensorboardX.crc32c import crc32c
    except ImportError:
        return None
    return crc32c


def _masked(crc: int) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits, add a constant (so that a CRC of data
    that itself holds CRCs does not come out trivially)."""
    crc &= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path) -> list[bytes]:
    """The payloads of one TFRecord file: uint64 length, uint32 masked CRC of the length bytes,
    the data, uint32 masked CRC of the data (little-endian). An incomplete last record (the
    writer is still writing it) is left out; a wrong CRC raises DataError."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})")
    crc32c = _crc32c()
    out, pos = [], 0
    while pos + 12 <= len(buf):
        header = buf[pos:pos + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", buf[pos + 8:pos + 12])
        if crc32c is not None and _masked(crc32c(header)) != length_crc:
            raise DataError(f"{path}: record at byte {pos}: the CRC of its length does not match")
        end = pos + 12 + length + 4
        if end > len(buf):
            break
        data = buf[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", buf[end - 4:end])
        if crc32c is not None and _masked(crc32c(data)) != data_crc:
            raise DataError(f"{path}: record at byte {pos}: the CRC of its data does not match")
        out.append(data)
        pos = end
    return out


# TensorProto dtypes a scalar may come as (types.proto): struct format, and the repeated field
# used when tensor_content is empty.
_DTYPES = {1: ("<f", "float_val"), 2: ("<d", "double_val"), 3: ("<i", "int_val"),
           9: ("<q", "int64_val"), 19: ("<e", "half_val")}


def _tensor_value(t) -> float | None:
    """The value of a one-element numeric TensorProto, else None (text, histograms...)."""
    if t.dtype not in _DTYPES or math.prod(d.size for d in t.tensor_shape.dim) != 1:
        return None
    fmt, field = _DTYPES[t.dtype]
    if t.tensor_content:
        if len(t.tensor_content) != struct.calcsize(fmt):
            return None
        return float(struct.unpack(fmt, t.tensor_content)[0])
    vals = getattr(t, field)
    if len(vals) != 1:
        return None
    if field == "half_val":                  # float16 bit patterns stored in int32s
        return float(struct.unpack("<e", struct.pack("<H", vals[0] & 0xFFFF))[0])
    return float(vals[0])


def event_files(logdir) -> list[Path]:
    """The event files of one run: logdir itself if it is a file, else its tfevents files
    (not those of sub-folders, which TensorBoard shows as other runs), oldest name first."""
    p = Path(logdir)
    if p.is_file():
        return [p]
    return sorted(f for f in p.glob("*tfevents*") if f.is_file())


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] in the order written, from every event file of the run.
    Both encodings are read: simple_value (what tensorboardX writes) and one-element tensors
    (TensorFlow 2's tf.summary.scalar), whose plugin is named only on a tag's first value."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        raise UsageError("reading TensorBoard files needs tensorboardX: pip install -e '.[tensorboard]'") from None
    out: dict[str, list[tuple[int, float]]] = {}
    plugin: dict[str, str] = {}
    for path in event_files(logdir):
        for data in read_records(path):
            event = Event()
            try:
                event.ParseFromString(data)
            except Exception as exc:          # protobuf's DecodeError, whose module varies
                raise DataError(f"{path}: a record is not an Event ({exc})")
            if event.WhichOneof("what") != "summary":
                continue                       # file_version, graphs, session logs
            for v in event.summary.value:
                if v.HasField("metadata") and v.metadata.plugin_data.plugin_name:
                    plugin.setdefault(v.tag, v.metadata.plugin_data.plugin_name)
                kind = v.WhichOneof("value")
                value: float | None
                if kind == "simple_value":
                    value = float(v.simple_value)
                elif kind == "tensor" and plugin.get(v.tag, "scalars") == "scalars":
                    value = _tensor_value(v.tensor)
                else:
                    value = None
                if value is not None:
                    out.setdefault(v.tag, []).append((int(event.step), value))
    return out
