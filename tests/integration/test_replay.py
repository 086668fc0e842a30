"""``python -m proxy replay`` through the real pipeline, model and index, with a synthetic backend."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from proxy import replay
from proxy.config import Config
from proxy.embedding import SentenceEmbedder

PROMPTS = [
    "How do I reset my password?",
    "How can I reset my password?",         # semantic hit (MiniLM 0.99)
    "How do I reset my password?",          # exact hit
    "Is it not safe to eat raw eggs?",
    "Is it safe to eat raw eggs?",          # above the threshold, refused by the negation guard
    "如何重置我的密码？",                     # Chinese: exact caching only by default
]


def test_replay_counts_hits_saved_calls_and_tokens(servers: Any, embedder: SentenceEmbedder,
                                                   tmp_path: Path) -> None:
    config = Config()
    tally, bypass, refusals, calls = servers.run(replay.replay(
        config, PROMPTS, completion_tokens=100, embedders={config.embedding.ident: embedder}))
    assert dict(tally.results) == {"miss": 4, "semantic": 1, "exact": 1}
    assert calls == 4
    assert bypass == {"language": 1.0}
    assert refusals == {"negation": 1.0}
    # each hit saved its cached answer's usage: the prompt's estimate and the fixed completion
    expected_prompt = 2 * replay.estimate_tokens(PROMPTS[0])
    assert (tally.prompt_tokens_saved, tally.completion_tokens_saved) == (expected_prompt, 200)
    (score, new, cached), = tally.semantic
    assert (new, cached) == (PROMPTS[1], PROMPTS[0]) and score > 0.97

    out = io.StringIO()
    replay.print_report(tally, bypass, refusals, calls, config, show=5, out=out)
    text = out.getvalue()
    assert "hit ratio           2  33.3%" in text
    assert "backend calls made 4, saved 2" in text
    assert "language 1" in text and "negation 1" in text
    assert "new:    How can I reset my password?" in text


def test_prompt_files_may_hold_strings_or_objects(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a", {"prompt": "b"}, {"text": "c"}, {"content": "d"}]))
    assert replay.load_prompts(path) == ["a", "b", "c", "d"]
    path.write_text(json.dumps([1]))
    with pytest.raises(ValueError, match="item 0"):
        replay.load_prompts(path)
