"""Peak memory of data preparation on a large generated corpus: bounded, not growing with the corpus.

Writes ``--mb`` megabytes of generated English-like text as jsonl documents (Zipf-distributed words, 2-20 KB
each), then runs ``TokenDataModule.prepare_data`` (BPE training, tokenisation, shard writing) in a fresh
process and reports its wall time and two peaks, sampled every 100 ms over the process and its tokenisation
workers together as proportional set sizes (pages shared by forked workers counted once): anonymous memory
(``Pss_Anon``, what the run really needs) and all resident memory (``Pss``, which also counts pages of the
memory-mapped arrow files that the kernel may drop at any time). Target: under 2 GB for a 1 GB corpus.

Measured on the 2-core dev machine (default num_proc, i.e. two tokenisation workers), anonymous memory
stays flat while the corpus grows 15-fold; only the reclaimable file pages grow with it:

    corpus   time    anonymous   all resident
    20 MB     37 s     606 MiB        651 MiB
    100 MB    99 s     610 MiB        739 MiB
    300 MB   514 s     644 MiB       1368 MiB

    python scripts/bench_prepare_memory.py --mb 1024
    python scripts/bench_prepare_memory.py --mb 200 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PREPARE = """
import sys
from sa_train.data import TokenDataModule
dm = TokenDataModule(source=sys.argv[1], cache_dir=sys.argv[2], num_proc=int(sys.argv[3]) or None)
dm.prepare_data()
"""


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """Generate about ``megabytes`` MB of jsonl documents; returns the number of documents."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    lengths = rng.integers(2, 10, size=20_000)
    words = np.array(["".join(rng.choice(letters, size=n)) for n in lengths])
    target, written, docs = megabytes * 1_000_000, 0, 0
    with path.open("w", encoding="utf-8") as fh:
        while written < target:
            ranks = np.minimum(rng.zipf(1.2, size=int(rng.integers(400, 4000))), len(words)) - 1
            line = json.dumps({"text": " ".join(words[ranks])}) + "\n"
            fh.write(line)
            written += len(line)
            docs += 1
    return docs


def tree_memory_kib(pid: int) -> dict[str, int]:
    """``Pss_Anon`` and ``Pss`` (KiB) of a process and all its descendants, summed, from /proc."""
    total = {"Pss_Anon": 0, "Pss": 0}
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # it exited while being read
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=1024, help="corpus size in MB (1024)")
    parser.add_argument("--num-proc", type=int, default=0, help="tokenisation processes; 0: the default")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpus and cache go (a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        start = time.perf_counter()
        docs = write_corpus(corpus, args.mb)
        elapsed = time.perf_counter() - start
        print(f"generated {corpus.stat().st_size / 1e6:.0f} MB, {docs} documents in {elapsed:.0f} s")
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(corpus), str(Path(tmp) / "cache"), str(args.num_proc)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak = {"Pss_Anon": 0, "Pss": 0}
        while process.poll() is None:
            now = tree_memory_kib(process.pid)
            peak = {key: max(peak[key], now[key]) for key in peak}
            time.sleep(0.1)
        if process.returncode:
            raise SystemExit(f"prepare_data failed with status {process.returncode}")
        seconds = time.perf_counter() - start
        print(
            f"prepare_data of {args.mb} MB: {seconds:.0f} s; peaks over the process tree: anonymous "
            f"memory {peak['Pss_Anon'] / 1024:.0f} MiB, all resident memory {peak['Pss'] / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main()
