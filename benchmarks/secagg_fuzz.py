"""The fuzzing server against honest secure-aggregation clients, for many rounds, judged by the
leakage oracle (hpcfl/privacy/leakage.py): what the server can compute from everything it was
sent, whatever it chose to do.

    python benchmarks/secagg_fuzz.py --rounds 100000 --workers 2 --out benchmarks/results

Each round is server_attacks.fuzz_round(seed) played by server_attacks.FuzzServer (random
routings, drop declarations, split views, forged keys, colluders' signatures) against the real
secagg.Client objects and wire formats, for seeds 0.. --rounds - 1. A round "leaks" when the
oracle finds a function of the inputs the server can evaluate that is not a multiple of one
accepted survivor set's sum (of at least min_survivors clients). The positive control plays the
first --control rounds against the client of 58aac60 (before the routing was bound to the signed
view), where the same fuzzer must find leaks. Writes secagg_fuzz.csv and the section
"Secure aggregation: the fuzzing server" of PRIVACY.md (between its markers). Exits 1 if any
round against today's client leaks, or if the control finds none (the fuzzer would be blind).
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from common import machine_info, write_csv

MARK_BEGIN, MARK_END = "<!-- secagg_fuzz: begin -->", "<!-- secagg_fuzz: end -->"


def _client_classes():
    from hpcfl.privacy import secagg

    class Client58aac60(secagg.Client):
        """58aac60's client: no routing bound to the view, self-mask shares for any survivor."""

        def _check_routing(self, survivors, dropped):
            pass

        def _must_have_signed(self):
            return set()

    return {"today": secagg.Client, "58aac60": Client58aac60}


def play(job: tuple[str, int, int]) -> dict:
    """Rounds [start, stop) against one client; counts, and the seeds that leaked."""
    from hpcfl.privacy import server_attacks

    which, start, stop = job
    cls = _client_classes()[which]
    out = {"client": which, "rounds": 0, "leaks": 0, "detected": 0, "released": 0,
           "complete": 0, "sparse": 0, "leaked_seeds": []}
    for seed in range(start, stop):
        params, corrupt = server_attacks.fuzz_round(seed)
        got = server_attacks.fuzz(params, seed, corrupt, client_cls=cls)
        out["rounds"] += 1
        out["detected"] += bool(got["detected"])
        out["released"] += bool(got["leak"].functions)
        out["complete" if params.k is None else "sparse"] += 1
        if not got["leak"].ok:
            out["leaks"] += 1
            out["leaked_seeds"].append(seed)
    return out


def run(which: str, rounds: int, workers: int, chunk: int = 500) -> dict:
    jobs = [(which, a, min(a + chunk, rounds)) for a in range(0, rounds, chunk)]
    total = {"client": which, "rounds": 0, "leaks": 0, "detected": 0, "released": 0, "complete": 0,
             "sparse": 0, "leaked_seeds": []}
    t0 = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        for part in pool.imap_unordered(play, jobs):
            for k in ("rounds", "leaks", "detected", "released", "complete", "sparse"):
                total[k] += part[k]
            total["leaked_seeds"] += part["leaked_seeds"]
    total["seconds"] = time.perf_counter() - t0
    return total


def section(rows: list[dict], command: str, info: str) -> str:
    lines = [MARK_BEGIN, "## Secure aggregation: the fuzzing server", "",
             f"Measured by `{command}` ({info}). Each round: 3-10 clients on the complete graph with up to "
             "the colluders the consistency round withstands, or 8-14 on a sparse graph (K = 2, 4 or 6) "
             "without colluders; the fuzzing server deviates at random at every stage (forged keys, "
             "routings that withhold shares, survivor and dropped sets of its choosing, several views, "
             "held-back signatures, colluders' signatures on any view). A leak is any function of the "
             "inputs the server can evaluate that is not a multiple of one accepted survivor set's sum "
             "(the leakage oracle).", "",
             "| client | rounds | complete / sparse graphs | a client aborted | some sum learned | leaks | seconds |",
             "|---|---|---|---|---|---|---|"]
    names = {"today": "this checkout's"}
    for r in rows:
        lines.append(f"| {names.get(r['client'], r['client'])} | {r['rounds']:,} | {r['complete']:,} / "
                     f"{r['sparse']:,} | {r['detected']:,} | {r['released']:,} | **{r['leaks']:,}** | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "The 58aac60 row is the positive control: the same fuzzer, against the client the audit "
              "broke, finds leaking rounds; against today's client it finds none.", "", MARK_END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    from common import write_marked

    write_marked(BENCH / "PRIVACY.md", MARK_BEGIN, MARK_END, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100_000)
    ap.add_argument("--control", type=int, default=5_000, help="rounds against 58aac60's client")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args()
    today = run("today", args.rounds, args.workers)
    control = run("58aac60", args.control, args.workers)
    rows = [today, control]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "secagg_fuzz.csv", [{k: v for k, v in r.items() if k != "leaked_seeds"}
                                             | {"leaked_seeds": " ".join(map(str, r["leaked_seeds"][:50]))}
                                             for r in rows])
    info = machine_info()
    command = (f"python benchmarks/secagg_fuzz.py --rounds {args.rounds} --control {args.control} "
               f"--workers {args.workers}")
    write_section(section(rows, command, f"{info['date']}, {info.get('cpu_model', '?')}, {info['cores']} cores, "
                                         f"{args.workers} worker processes"))
    for r in rows:
        print(f"{r['client']}: {r['rounds']} rounds, {r['leaks']} leaks, {r['detected']} with an abort, "
              f"{r['seconds']:.0f} s")
    if today["leaks"]:
        print(f"LEAKS against today's client, seeds {today['leaked_seeds'][:20]}", file=sys.stderr)
        return 1
    if not control["leaks"]:
        print("the control found no leak: the fuzzer is blind", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
