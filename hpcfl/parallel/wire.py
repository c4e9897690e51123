"""The id-map wire format: {id: bytes} as one byte string, for messages between ranks that
carry one item per client (secure aggregation's messages, the robust rules' updates, SCAFFOLD's
checkpointed variates). Pure bytes, no MPI:

    count u32 | (id u32, length u32) x count, ids increasing | the items' bytes, in id order
"""
from __future__ import annotations

import struct
from collections.abc import Mapping


class MalformedMessage(ValueError):
    """Bytes that are not an id map (truncated, ids out of order, lengths that do not add up)."""


def encode_map(items: Mapping[int, bytes]) -> bytes:
    ids = sorted(items)
    head = struct.pack(f"<I{2 * len(ids)}I", len(ids), *[v for i in ids for v in (i, len(items[i]))])
    return head + b"".join(bytes(items[i]) for i in ids)


def decode_map(data: bytes) -> dict[int, bytes]:
    data = bytes(data)
    if len(data) < 4:
        raise MalformedMessage("truncated id map")
    (count,) = struct.unpack_from("<I", data)
    end = 4 + 8 * count
    if len(data) < end:
        raise MalformedMessage("truncated id map header")
    fields = struct.unpack_from(f"<{2 * count}I", data, 4)
    ids, lengths = fields[0::2], fields[1::2]
    if any(a >= b for a, b in zip(ids, ids[1:])) or end + sum(lengths) != len(data):
        raise MalformedMessage("malformed id map (ids not increasing, or lengths do not add up)")
    out = {}
    for i, n in zip(ids, lengths):
        out[i] = data[end:end + n]
        end += n
    return out
