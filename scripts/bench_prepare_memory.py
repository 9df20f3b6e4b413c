"""Peak memory of data preparation on a large generated corpus: bounded, not growing with the corpus.

Writes ``--mb`` megabytes of generated English-like text as jsonl documents (Zipf-distributed words, 2-20 KB
each), then runs ``TokenDataModule.prepare_data`` (BPE training, tokenisation, shard writing) in a fresh
process and reports its wall time and peak resident set size (``ru_maxrss`` of the preparing process and
its tokenisation workers: the largest single process). Target: under 2 GB for a 1 GB corpus.

    python scripts/bench_prepare_memory.py --mb 1024
    python scripts/bench_prepare_memory.py --mb 200 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
        subprocess.run(
            [sys.executable, "-c", PREPARE, str(corpus), str(Path(tmp) / "cache"), str(args.num_proc)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
        print(f"prepare_data: {seconds:.0f} s, peak RSS {peak_mb:.0f} MiB for a {args.mb} MB corpus")


if __name__ == "__main__":
    main()
