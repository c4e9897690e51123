"""Privacy spent, written down before it is spent.

A Ledger is an append-only file of JSON lines beside the checkpoints, flushed and fsynced before
each release it records, so that a release made after the last checkpoint and before a crash is
still composed when the run resumes (a checkpoint alone would forget it). Without
--checkpoint-dir a run cannot resume, and the ledger lives in memory only. One writer per file
(rank 0 for DP-SGD and central DP-FedAvg; each client group's leader for the clients it trains
under secure aggregation), so lines never interleave; a line torn by a crash is ignored (its
release never happened: the line is written before it).

Line kinds:
  {"start": A}                                 attempt A of the run begins (0 for the first)
  {"release": "rdp", "unit": U, "count": C, "q": Q, "z": Z, "noise": N}
                                               units U..U+C-1 (steps or rounds) released with
                                               noise multiplier Z on Poisson samples of rate Q;
                                               N names their noise: the attempt, or "seeded"
  {"settle": U, "count": C}                    of the reservation starting at U, only C were
                                               released (a stop inside an epoch)
  {"release": "clients", "round": R, "clients": [...], "mu2": M, "noise": N}
                                               those clients' inputs entered round R's release
                                               with Gaussian-DP cost mu^2 = M each
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

FILE = "dp-ledger.jsonl"


def clients_file(writer: int) -> str:
    return f"dp-ledger-clients-{writer}.jsonl"


class Ledger:
    """One writer's ledger: `path` None keeps it in memory."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path is not None else None
        self._memory: list[dict] = []

    def append(self, entry: dict) -> None:
        """Writes the line and makes it durable before returning."""
        self._memory.append(entry)
        if self.path is None:
            return
        line = json.dumps(entry, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        return read(self.path) if self.path is not None else list(self._memory)

    def start(self) -> int:
        """Begins a new attempt: its number (0 for the first)."""
        attempt = sum("start" in e for e in self.entries())
        self.append({"start": attempt})
        return attempt


def read(path: Path | str) -> list[dict]:
    """The intact lines of a ledger file ([] when there is none)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:          # torn by a crash while it was written: never released
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def released_units(entries: Iterable[dict]) -> dict[tuple[int, str, float], float]:
    """{(unit, noise, z): q} of the "rdp" releases: every unit of every attempt, a unit released
    again with the same noise ("seeded", same z) once, settled reservations at what was released."""
    entries = list(entries)
    settled = {(e["settle"], e.get("attempt")): e["count"] for e in entries if "settle" in e}
    released: dict[tuple[int, str, float], float] = {}
    for e in entries:
        if e.get("release") != "rdp":
            continue
        count = settled.get((e["unit"], e.get("attempt")), e["count"])
        for u in range(e["unit"], e["unit"] + count):
            released[(u, str(e["noise"]), float(e["z"]))] = float(e["q"])
    return released


def rdp_events(entries: Iterable[dict]) -> list[tuple[float, float, int]]:
    """The (q, z, count) events of released_units."""
    totals: dict[tuple[float, float], int] = {}
    for (_, _, z), q in released_units(entries).items():
        totals[(q, z)] = totals.get((q, z), 0) + 1
    return [(q, z, c) for (q, z), c in sorted(totals.items())]


def _client_releases(entries: Iterable[dict]) -> dict[tuple, float]:
    """{(client, round, noise, mu2): mu2} of the "clients" releases: one key per release, so a
    round redone with the same seeded noise (bitwise the same release) is there once."""
    seen: dict[tuple, float] = {}
    for e in entries:
        if e.get("release") == "clients":
            for c in e["clients"]:
                seen[(int(c), int(e["round"]), str(e["noise"]), float(e["mu2"]))] = float(e["mu2"])
    return seen


def client_spend(entries: Iterable[dict]) -> dict[int, float]:
    """{client: its mu^2 so far} from "clients" releases (a round redone with the same seeded
    noise counts once)."""
    out: dict[int, float] = {}
    for (c, *_), mu2 in _client_releases(entries).items():
        out[c] = out.get(c, 0.0) + mu2
    return out


class ClientBooks:
    """The privacy books of the clients one client group's leader trains under secure
    aggregation: each client's spend (mu^2 of Gaussian DP, over the rounds it joined), kept by
    the client's side, never the server's. A client joins a round only if its spend plus the
    round's worst cost stays within its budget (a privacy filter), and the spend is written
    before its masked input leaves. A seeded run's redone round (after a resume) is the same
    release again: it costs nothing more, and the client joins it as it did the first time, so
    the redone round is bitwise the first."""

    def __init__(self, book: Ledger, spent: dict[int, float], budget: float | None,
                 released: Iterable[tuple] = ()):
        self.book, self.spent, self.budget = book, dict(spent), budget
        self.released = {key for key in released if key[2] == "seeded"}   # (client, round, noise, mu2)

    @classmethod
    def open(cls, directory: str | None, writer: int, clients: Iterable[int], budget: float | None) -> ClientBooks:
        """Writer `writer`'s books for `clients`, with what every ledger in `directory` holds of them."""
        spent: dict[int, float] = {}
        released: list[tuple] = []
        if directory:
            entries = [e for p in sorted(Path(directory).glob("dp-ledger-clients-*.jsonl")) for e in read(p)]
            mine = set(clients)
            spent = {c: v for c, v in client_spend(entries).items() if c in mine}
            released = [key for key in _client_releases(entries) if key[0] in mine]
        return cls(Ledger(Path(directory) / clients_file(writer) if directory else None), spent, budget, released)

    def can_afford(self, client: int, mu2: float, server_round: int | None = None, noise: str = "") -> bool:
        if (client, server_round, noise, mu2) in self.released:
            return True                                  # already paid for: the same seeded release
        return self.budget is None or self.spent.get(client, 0.0) + mu2 <= self.budget

    def spend(self, server_round: int, clients: list[int], mu2: float, noise: str) -> None:
        if not clients:
            return
        self.book.append({"release": "clients", "round": int(server_round), "clients": [int(c) for c in clients],
                          "mu2": float(mu2), "noise": noise})
        for c in clients:
            key = (int(c), int(server_round), noise, float(mu2))
            if key in self.released:
                continue
            self.spent[c] = self.spent.get(c, 0.0) + mu2
            if noise == "seeded":
                self.released.add(key)

    def max_spent(self) -> float:
        return max(self.spent.values(), default=0.0)
