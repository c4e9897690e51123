"""--tensorboard: every numeric field of every record reaches the event file, at the record's
epoch (dp) or round (fl), read back by hpcfl.io.tensorboard.read_scalars, which parses the files
itself (TFRecord framing, CRCs, Event protos) rather than through the writer's code."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboardX")

from helpers import DATA_DIR, needs_mnist

import hpcfl
from hpcfl.io import tensorboard as tb


def f32(x) -> float:
    """What a TensorBoard scalar (a float32 simple_value) keeps of x."""
    return float(np.float32(x))


DP_RECORDS = [
    {"mode": "dp", "epoch": 1, "step": 59, "ranks": 2, "train_loss": 0.6131, "test_loss": np.float64(0.29),
     "test_accuracy": np.float64(0.9138), "epoch_seconds": 0.2923, "samples_per_second": 87577.96,
     "gflops_per_rank": 8.9567, "dp_epsilon": 0.8819, "dp_noise": 1.0, "dp_delta": 1e-5,
     "dp_clipped_fraction": 0.4455, "converged": False, "lr_note": "cosine", "spread": float("nan"),
     "peak": float("inf"), "skipped": None, "brand_new_metric": np.int64(7)},
    {"mode": "dp", "epoch": 2, "step": 118, "ranks": 2, "train_loss": 0.2501, "test_loss": 0.21,
     "test_accuracy": 0.9402, "epoch_seconds": 0.2011, "samples_per_second": 91000.5, "gflops_per_rank": 9.5,
     "dp_epsilon": 1.2345, "dp_noise": 1.0, "dp_delta": 1e-5, "dp_clipped_fraction": 0.4012,
     "converged": True, "lr_note": "cosine", "spread": float("-inf"), "peak": 3.5, "skipped": None,
     "brand_new_metric": np.int64(8)},
]
DP_TAGS = {"progress/step": "step", "run/ranks": "ranks", "loss/train": "train_loss", "loss/test": "test_loss",
           "accuracy/test": "test_accuracy", "time/seconds": "epoch_seconds",
           "throughput/samples_per_second": "samples_per_second", "throughput/gflops_per_rank": "gflops_per_rank",
           "privacy/dp_epsilon": "dp_epsilon", "privacy/dp_noise": "dp_noise", "privacy/dp_delta": "dp_delta",
           "privacy/dp_clipped_fraction": "dp_clipped_fraction", "other/brand_new_metric": "brand_new_metric",
           "other/peak": "peak"}

FL_RECORDS = [
    {"mode": "fl", "round": r, "ranks": 1, "clients": 8, "dropped": r - 1, "rejected": 0, "stragglers": 1,
     "skipped": None, "train_loss": 0.78 / r, "test_accuracy": None if r == 2 else 0.13 * r,
     "round_seconds": 0.298 / r, "samples_per_second": 80434.86 * r, "bytes_to_server": 830400,
     "bytes_from_server": 837536 + r, "secagg_seconds": 0.0608 / r,
     "secagg_stages": {"keys": 0.0139 / r, "shares": 0.0192, "masking": 0.0116, "unmasking": 0.0128 * r},
     "server_attack": {"name": "dos", "target": 3, "detected": True, "detected_by": None},
     "dp_honest_shares": 7, "dp_epsilon": 3.4788 * r, "dp_noise": 1.1832, "dp_delta": 1e-5,
     "dp_clipped": None if r == 3 else 8, "test_loss": 3.346 - r, "secagg_new_stat": float("nan")}
    for r in (1, 2, 3)
]
FL_TAGS = {"run/ranks": "ranks", "clients/sampled": "clients", "clients/dropped": "dropped",
           "clients/rejected": "rejected", "clients/stragglers": "stragglers", "loss/train": "train_loss",
           "accuracy/test": "test_accuracy", "time/seconds": "round_seconds",
           "throughput/samples_per_second": "samples_per_second", "traffic/bytes_to_server": "bytes_to_server",
           "traffic/bytes_from_server": "bytes_from_server", "secagg/total_seconds": "secagg_seconds",
           "secagg/keys": ("secagg_stages", "keys"), "secagg/shares": ("secagg_stages", "shares"),
           "secagg/masking": ("secagg_stages", "masking"), "secagg/unmasking": ("secagg_stages", "unmasking"),
           "attack/server/target": ("server_attack", "target"), "privacy/dp_honest_shares": "dp_honest_shares",
           "privacy/dp_epsilon": "dp_epsilon", "privacy/dp_noise": "dp_noise", "privacy/dp_delta": "dp_delta",
           "privacy/dp_clipped": "dp_clipped", "loss/test": "test_loss"}


def expected(records, tags, step_key):
    """tag -> [(step, float32 value)] for the records' values that are finite numbers."""
    out = {}
    for rec in records:
        for tag, key in tags.items():
            value = rec.get(key) if isinstance(key, str) else rec[key[0]].get(key[1])
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value):
                out.setdefault(tag, []).append((rec[step_key], f32(value)))
    return out


@pytest.mark.parametrize("records, tags, step_key",
                         [(DP_RECORDS, DP_TAGS, "epoch"), (FL_RECORDS, FL_TAGS, "round")], ids=["dp", "fl"])
def test_every_finite_number_is_written_at_its_epoch_or_round(tmp_path, records, tags, step_key):
    with tb.TensorBoardWriter(str(tmp_path)) as writer:
        for rec in records:
            writer(dict(rec))
    got = tb.read_scalars(tmp_path)
    want = expected(records, tags, step_key)
    # the exact set of tags: nothing dropped, and no bool, string, None, NaN or inf written
    assert got == want
    assert got["accuracy/test"] == [(r[step_key], f32(r["test_accuracy"])) for r in records
                                    if r["test_accuracy"] is not None]
    if step_key == "epoch":     # inf in epoch 1, a number in epoch 2; NaN, bools, text never
        assert got["other/peak"] == [(2, 3.5)] and not any("spread" in t or "converged" in t for t in got)
    else:                       # dp_clipped None in round 3; the nested bool and None are left out
        assert [s for s, _ in got["privacy/dp_clipped"]] == [1, 2]
        assert not any(t.startswith("secagg/new_stat") or "detected" in t for t in got)


def test_tags_for_keys_nobody_listed():
    assert tb.tag_for("dp_epsilon") == "privacy/dp_epsilon" and tb.tag_for("secagg_clipped") == "secagg/clipped"
    assert tb.tag_for("aggregate_memory_bytes") == "memory/aggregate_bytes"
    assert tb.tag_for("something_else") == "other/something_else" and tb.tag_for("dp_") == "other/dp_"
    # two keys that map to one tag in one record: both kept
    assert tb.scalars({"epoch_seconds": 1.0, "round_seconds": 2.0}) == {"time/seconds": 1.0,
                                                                       "other/round_seconds": 2.0}


def test_records_without_a_step_are_numbered_after_the_last_one(tmp_path):
    with tb.TensorBoardWriter(tmp_path) as writer:
        writer({"epoch": 4, "train_loss": 1.0})
        writer({"train_loss": 0.5})
        writer({"epoch": True, "train_loss": 0.25})     # a bool is no step either
    assert tb.read_scalars(tmp_path) == {"loss/train": [(4, 1.0), (5, 0.5), (6, 0.25)]}


def test_close_is_idempotent_and_a_closed_writer_refuses_records(tmp_path):
    writer = tb.TensorBoardWriter(str(tmp_path / "run"))
    writer({"mode": "fl", "round": 1, "test_accuracy": 0.5})
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer({"mode": "fl", "round": 2, "test_accuracy": 0.6})
    assert len(tb.event_files(tmp_path / "run")) == 1      # no second file opened after close
    assert tb.read_scalars(tmp_path / "run") == {"accuracy/test": [(1, 0.5)]}
    assert tb.read_scalars(tb.event_files(tmp_path / "run")[0]) == {"accuracy/test": [(1, 0.5)]}


def test_without_tensorboardx_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)     # import now raises ImportError
    message = r"^--tensorboard needs tensorboardX: pip install -e '\.\[tensorboard\]'$"
    with pytest.raises(hpcfl.UsageError, match=message):
        tb.TensorBoardWriter(str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_logdir_that_cannot_be_a_folder_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(hpcfl.UsageError, match="--tensorboard .*file: cannot write there"):
        tb.TensorBoardWriter(str(tmp_path / "file"))


def test_the_reader_checks_crcs_and_skips_a_record_still_being_written(tmp_path):
    from tensorboardX.crc32c import crc32c

    assert crc32c(b"123456789") == 0xE3069283                   # the CRC-32C check value
    with tb.TensorBoardWriter(tmp_path) as writer:
        for r in (1, 2):
            writer({"mode": "fl", "round": r, "train_loss": r / 4})
    (path,) = tb.event_files(tmp_path)
    good = path.read_bytes()
    assert tb.read_scalars(tmp_path) == {"loss/train": [(1, 0.25), (2, 0.5)]}
    path.write_bytes(good[:-3])                                  # the last record cut short
    assert tb.read_scalars(tmp_path) == {"loss/train": [(1, 0.25)]}
    bad = bytearray(good)
    bad[-6] ^= 0x01                                              # one bit in the last record's data
    path.write_bytes(bytes(bad))
    with pytest.raises(hpcfl.DataError, match="CRC of its data"):
        tb.read_scalars(tmp_path)
    bad = bytearray(good)
    bad[2] ^= 0x01                                               # one bit in the first length
    path.write_bytes(bytes(bad))
    with pytest.raises(hpcfl.DataError, match="CRC of its length"):
        tb.read_scalars(tmp_path)


def test_the_reader_also_reads_tensor_encoded_scalars(tmp_path):
    """TensorFlow 2 writes scalars as one-element tensors, naming the plugin on the first only."""
    import struct

    from tensorboardX.event_file_writer import EventFileWriter
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.proto.tensor_pb2 import TensorProto

    scalars_meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
    text_meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    events = [
        Summary.Value(tag="acc", tensor=TensorProto(dtype=1, tensor_content=struct.pack("<f", 0.75)),
                      metadata=scalars_meta),
        Summary.Value(tag="acc", tensor=TensorProto(dtype=1, float_val=[0.875])),
        Summary.Value(tag="eps", tensor=TensorProto(dtype=2, double_val=[1.0 / 3])),
        Summary.Value(tag="n", tensor=TensorProto(dtype=9, int64_val=[2 ** 40])),
        Summary.Value(tag="word", tensor=TensorProto(dtype=7, string_val=[b"hi"]), metadata=text_meta),
        Summary.Value(tag="count", tensor=TensorProto(dtype=3, int_val=[5]), metadata=text_meta),
        Summary.Value(tag="hist", tensor=TensorProto(dtype=1, float_val=[1.0, 2.0])),
        Summary.Value(tag="plain", simple_value=0.5),
    ]
    w = EventFileWriter(str(tmp_path))
    for step, value in enumerate(events, 1):
        w.add_event(Event(step=step, wall_time=0.0, summary=Summary(value=[value])))
    w.close()
    assert tb.read_scalars(tmp_path) == {"acc": [(1, 0.75), (2, 0.875)], "eps": [(3, 1.0 / 3)],
                                         "n": [(4, float(2 ** 40))], "plain": [(8, 0.5)]}


# --- real runs, in process ------------------------------------------------------------------

TINY = {"hidden": (16,), "quiet": True, "data_dir": str(DATA_DIR)}
RUNS = {
    "dp": dict(mode="dp", epochs=2, batch_size=1024, **TINY),
    "fl": dict(mode="fl", rounds=2, num_clients=20, **TINY),
    "fl-secure-dp": dict(mode="fl", rounds=2, num_clients=20, client_fraction=0.5, secure_agg=True,
                         dp_clip=0.2, dp_noise=1.0, dp_noise_seed=1, **TINY),   # seeded: both rounds released
}


@needs_mnist
@pytest.mark.parametrize("name", list(RUNS))
def test_a_real_run_writes_its_records(tmp_path, name):
    cfg = hpcfl.Config(metrics=str(tmp_path / "run.jsonl"), **RUNS[name])
    writer = tb.TensorBoardWriter(str(tmp_path / "tb"))
    try:
        result = hpcfl.train(cfg, callbacks=[writer])
    finally:
        writer.close()                       # what the command line does at the end of a run
    writer.close()
    step_key = "epoch" if cfg.mode == "dp" else "round"
    metrics = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r[step_key] for r in metrics] == [r[step_key] for r in result.history] == [1, 2]
    got = tb.read_scalars(tmp_path / "tb")

    for records in (metrics, result.history):
        assert got["accuracy/test"] == [(r[step_key], f32(r["test_accuracy"])) for r in records]
        if "dp_epsilon" in records[0]:          # DP: the training loss is not released
            assert "loss/train" not in got and "train_loss" not in records[0]
        else:
            assert got["loss/train"] == [(r[step_key], f32(r["train_loss"])) for r in records]
        assert got["time/seconds"] == [(r[step_key], f32(r[f"{step_key}_seconds"])) for r in records]
    assert got["accuracy/test"][-1][1] == f32(result.test_accuracy)
    # every number of every record, under the tag the mapping gives it, and nothing else
    want = {}
    for rec in metrics:
        for tag, value in tb.scalars(rec, step_key).items():
            want.setdefault(tag, []).append((rec[step_key], f32(value)))
    assert got == want
    if name == "fl-secure-dp":
        assert {"privacy/dp_epsilon", "secagg/total_seconds", "secagg/keys", "secagg/shares",
                "secagg/masking", "secagg/unmasking"} <= set(got)
        eps = [v for _, v in got["privacy/dp_epsilon"]]
        assert eps == sorted(eps) and eps[0] > 0          # privacy spent adds up
    assert not any(t.startswith("other/") for t in got), sorted(got)   # every real key is mapped
