"""Per-entry similarity floors learned from feedback: a hit marked wrong raises the bar for its entry.

A served semantic hit that a user marks wrong (``POST /admin/cache/feedback``, or a retry with
``Cache-Control: no-cache`` right after it) says: *at this similarity, this entry answered a
question it should not have*. The entry is evicted, but the same prompt is usually asked and
stored again under the same exact key (keys are hashes of scope and request, so the floor stays
inside its scope). Its floor then makes later hits on that entry need a similarity above the one
that went wrong: the neighbourhood that produced the wrong hit stops being served, closer
paraphrases still are.

Pure and bounded: two insertion-ordered maps of at most ``max_items`` keys each (about 150 bytes
a key), the oldest forgotten first. Per process, like the recent-hit memory the retry feedback
reads: with several replicas a floor is learned only where the feedback landed, and a restart
forgets them (a Redis copy was not built; docs/quality.md).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["FeedbackFloors"]


class FeedbackFloors:
    def __init__(self, max_items: int = 10_000) -> None:
        self._max_items = max_items
        self._served: OrderedDict[str, float] = OrderedDict()   # entry key -> last hit's similarity
        self._floors: OrderedDict[str, float] = OrderedDict()   # entry key -> similarity to beat

    def __len__(self) -> int:
        return len(self._floors)

    @staticmethod
    def _put(items: OrderedDict[str, float], key: str, value: float, max_items: int) -> None:
        items.pop(key, None)
        items[key] = value
        while len(items) > max_items:
            items.popitem(last=False)

    def served(self, entry_key: str, score: float) -> None:
        """``entry_key`` answered a semantic hit at ``score`` (what feedback will refer to)."""
        if self._max_items:
            self._put(self._served, entry_key, score, self._max_items)

    def wrong(self, entry_key: str, score: float | None = None) -> float | None:
        """A hit served by ``entry_key`` was wrong, at ``score`` (default: its latest semantic
        hit's similarity). Returns the entry's floor now, or None when it has none: the score is
        unknown (an exact hit, or one forgotten) or floors are off."""
        if not self._max_items:
            return None
        score = self._served.pop(entry_key, None) if score is None else score
        if score is None:
            return self._floors.get(entry_key)
        floor = max(score, self._floors.get(entry_key, score))
        self._put(self._floors, entry_key, floor, self._max_items)
        return floor

    def floor(self, entry_key: str) -> float | None:
        return self._floors.get(entry_key)

    def refuses(self, entry_key: str, score: float) -> bool:
        """Whether a candidate at ``score`` is at or below its entry's floor."""
        floor = self._floors.get(entry_key)
        return floor is not None and score <= floor
