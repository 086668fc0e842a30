"""Regenerate bench/data/ from the shared evaluation data (fixed seed, so the output is reproducible).

    python bench/make_eval_data.py ../shared/data

QQP: 6,000 pairs sampled from qqp_pairs_dev, split 4,000 tune / 2,000 held-out test.
LCQMC: 2,000 pairs sampled from lcqmc_zh_valid (tune), and 2,000 more, disjoint, held out
(lcqmc_test). WildChat prompts are copied unchanged.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
from pathlib import Path
from typing import Any

SEED = 20240601
OUT = Path(__file__).resolve().parent / "data"


def _load(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data: list[dict[str, Any]] = json.load(f)
    return data


def _save(path: Path, pairs: list[dict[str, Any]]) -> None:
    # mtime=0 keeps the gzip bytes identical between runs
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(json.dumps(pairs, ensure_ascii=False).encode("utf-8"))
    print(f"{path.name}: {len(pairs)} pairs, {sum(p['label'] for p in pairs)} positive")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, nargs="?", default=Path("../shared/data"))
    src: Path = parser.parse_args().source
    OUT.mkdir(exist_ok=True)
    rng = random.Random(SEED)

    qqp = rng.sample(_load(src / "qqp_pairs_dev.json.gz"), 6000)
    _save(OUT / "qqp_tune.json.gz", qqp[:4000])
    _save(OUT / "qqp_test.json.gz", qqp[4000:])
    lcqmc = _load(src / "lcqmc_zh_valid.json.gz")
    sample = rng.sample(lcqmc, 2000)
    _save(OUT / "lcqmc_sample.json.gz", sample)
    # held out for Chinese: 2,000 more pairs, none with a question pair of the sample
    taken = {(p["a"], p["b"]) for p in sample}
    rest = [p for p in lcqmc if (p["a"], p["b"]) not in taken]
    _save(OUT / "lcqmc_test.json.gz", random.Random(SEED + 1).sample(rest, 2000))
    shutil.copyfile(src / "wildchat_first_turns_280.json", OUT / "wildchat_first_turns_280.json")
    print("wildchat_first_turns_280.json: copied")


if __name__ == "__main__":
    main()
