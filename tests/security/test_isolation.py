"""Invariants 1 and 2: a cached or coalesced answer goes only to the tenant that produced it, and
nothing a tenant sees depends on another tenant's prompts.

Three tenants ask the SAME questions (the same bodies, so the only difference is who asks). The
tagging upstream (tests/security/conftest.py) starts every answer with the asking tenant's name,
so an answer served to the wrong tenant is visible in its text; the upstream also records who it
was asked by, so every tenant's first ask of every question must reach it. Probes mix exact
repeats, paraphrases (similarity >= 0.986 with all-MiniLM-L6-v2, no guard fires), concurrent
identical requests (coalesced), JSON and streamed answers, and spoofed headers on every request
(x-semcache-tenant, X-Forwarded-For, Cookie, OpenAI-Organization, a forged ``user``) naming
another tenant. Same-tenant positive controls must hit, so a scope that is simply never reused
cannot pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import requests

from proxy.app import make_policy
from proxy.cachekey import Directives, plan
from proxy.config import Config, TenancyConfig
from proxy.tenancy import identify
from tests.security.conftest import Answer, TaggingUpstream, ask, backend, run

TENANTS = ("alpha", "bravo", "charlie")
MODEL = "deepseek-chat"
VERBS = ("boil", "peel", "slice", "store", "freeze", "roast", "wash", "grow", "choose", "cook")
OBJECTS = ("an egg", "a potato", "an onion", "fresh basil", "a ripe mango", "brown rice", "a pumpkin",
           "green beans", "a cucumber", "sweet corn", "a carrot", "white bread", "a lemon", "garlic cloves",
           "a pineapple", "wild mushrooms", "a tomato", "an avocado", "spinach leaves", "a cabbage")
# Every tenant asks these. "How can I ..." is each one's paraphrase (0.986-0.999 to its question,
# at most 0.905 to any other question of the set).
QUESTIONS = tuple(f"How do I {verb} {obj}?" for verb in VERBS for obj in OBJECTS)
SUBJECTS = ("the ocean", "a glacier", "the desert wind", "a volcano", "the northern sky", "a thunderstorm",
            "a coral reef", "the tide", "a rainforest", "a canyon", "the moon", "a comet")
ASKS = ("look blue from far away", "make a loud sound", "change over a single year", "affect migrating birds",
        "matter to early sailors", "appear in old folk songs", "feel cold at night", "move so slowly")
# Asked first by one tenant only, then by the others (at most 0.34 to QUESTIONS, 0.85 to each other).
PRIVATE = tuple(f"Why does {subject} {ask}?" for subject in SUBJECTS for ask in ASKS)

# a lookup slower than lookup_timeout_s is served as a miss: on a busy 2-core machine under 24
# concurrent requests that would make the positive controls flaky, and timing is not the point here
RELAXED = {"lookup_timeout_s": 30.0}

TAG = re.compile(r"^\[(\w+)\] Answer to: (.*?) \| ")


def paraphrase(question: str) -> str:
    return question.replace("How do I", "How can I", 1)


def spoofed(rng: random.Random, tenant: str) -> tuple[dict[str, str], str]:
    """Headers and a ``user`` field claiming to be another tenant."""
    other = rng.choice([t for t in TENANTS if t != tenant])
    headers = {"x-semcache-tenant": other, "X-Forwarded-For": f"127.0.0.{rng.randint(2, 250)}",
               "Cookie": f"tenant={other}; session={rng.getrandbits(32):x}",
               "OpenAI-Organization": f"org-{other}", "X-Tenant-Id": other}
    return headers, other


@dataclass
class Tally:
    probes: int = 0
    states: Counter[str] = field(default_factory=Counter)
    wrong_tenant: list[tuple[str, str, str]] = field(default_factory=list)   # (asker, served tag, q)
    failures: list[str] = field(default_factory=list)

    def check(self, tenant: str, question: str, answer: Answer, *, stream: bool) -> None:
        self.probes += 1
        self.states[answer.state] += 1
        if answer.status != 200:
            self.failures.append(f"{tenant} {question!r}: HTTP {answer.status} {answer.body[:200]!r}")
            return
        if stream and not answer.done:
            self.failures.append(f"{tenant} {question!r}: stream without [DONE]")
        match = TAG.match(answer.content or "")
        if match is None:
            self.failures.append(f"{tenant} {question!r}: untagged answer {answer.content!r}")
            return
        if match.group(1) != tenant:
            self.wrong_tenant.append((tenant, match.group(1), question))


class Scenario:
    def __init__(self, url: str, fake: TaggingUpstream, auth: dict[str, str], seed: int) -> None:
        self.url = url
        self.fake = fake
        self.auth = auth            # tenant -> the Authorization header it sends
        self.rng = random.Random(seed)
        self.tally = Tally()

    async def probe(self, session: aiohttp.ClientSession, tenant: str, question: str, *,
                    stream: bool = False) -> Answer:
        headers, other = spoofed(self.rng, tenant)
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": question}],
                                "user": other}
        if stream:
            body["stream"] = True
        answer = await ask(session, self.url, body, {
            "Authorization": self.auth[tenant], "User-Agent": tenant, **headers})
        self.tally.check(tenant, question, answer, stream=stream)
        return answer

    def upstream_calls(self) -> Counter[tuple[str, str]]:
        """(tenant tag, question) -> calls that reached the upstream."""
        return Counter((tag, text) for tag, text, _ in self.fake.seen)

    async def gather(self, probes: list[Any], limit: int = 24) -> list[Answer]:
        gate = asyncio.Semaphore(limit)

        async def one(coro: Any) -> Answer:
            async with gate:
                result: Answer = await coro
                return result
        return list(await asyncio.gather(*(one(p) for p in probes)))


async def isolation_run(url: str, fake: TaggingUpstream, auth: dict[str, str], *, questions: int,
                        private: int, storm: int, seed: int = 7) -> Scenario:
    sc = Scenario(url, fake, auth, seed)
    common = QUESTIONS[:questions]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=32)) as session:
        # 1. cold, concurrent: every tenant asks every question three times at once (two JSON,
        # one streamed), all tenants together; a slow upstream makes the calls overlap
        # (long enough that a copy's lookup ends while the first copy's call is still out, even
        # on a busy machine)
        fake.latency_s = 0.5
        for start in range(0, len(common), 16):
            batch = common[start:start + 16]
            await sc.gather([sc.probe(session, tenant, q, stream=(copy == 2))
                             for q in batch for tenant in TENANTS for copy in range(3)], limit=144)
        fake.latency_s = 0.0
        await _wait_stores(session, url, len(fake.seen))
        calls = sc.upstream_calls()
        for q in common:
            for tenant in TENANTS:
                # the tenant's first ask reached the upstream, as that tenant
                assert calls[(tenant, q)] >= 1, f"{tenant} never asked the upstream {q!r}"
        cold_calls = sum(calls[(t, q)] for q in common for t in TENANTS)
        # positive control for coalescing: concurrent identical asks of one tenant shared calls
        # (three copies each; a copy whose lookup outlasts the first copy's call asks again)
        assert cold_calls <= 2 * len(common) * len(TENANTS), cold_calls

        # 2. warm: exact repeats (JSON and streamed) and paraphrases hit inside each tenant
        before = len(fake.seen)
        warm: list[tuple[str, str, Any]] = []
        for q in common:
            for tenant in TENANTS:
                warm += [(tenant, q, sc.probe(session, tenant, q)),
                         (tenant, q, sc.probe(session, tenant, q, stream=True)),
                         (tenant, paraphrase(q), sc.probe(session, tenant, paraphrase(q))),
                         (tenant, paraphrase(q), sc.probe(session, tenant, paraphrase(q), stream=True))]
        answers = await sc.gather([probe for _, _, probe in warm])
        for (_, asked, _), answer in zip(warm, answers, strict=True):
            expected = {"exact"} if asked in common else {"semantic", "exact"}
            assert answer.state in expected, (asked, answer.state)
        assert len(fake.seen) == before, "a warm probe reached the upstream"

        # 3. private questions: one tenant asks first; the others must miss and ask the upstream
        # themselves; the owner then hits
        owners = {q: TENANTS[i % 3] for i, q in enumerate(PRIVATE[:private])}
        stored = await _stores(session, url)
        await sc.gather([sc.probe(session, owner, q) for q, owner in owners.items()])
        await _wait_stores(session, url, stored + len(owners))
        cross: list[tuple[str, str, Any]] = [
            (tenant, q, sc.probe(session, tenant, q, stream=bool(i % 2)))
            for i, (q, owner) in enumerate(owners.items()) for tenant in TENANTS if tenant != owner]
        answers = await sc.gather([probe for _, _, probe in cross])
        calls = sc.upstream_calls()
        for (tenant, q, _), answer in zip(cross, answers, strict=True):
            assert answer.state == "miss", (tenant, q, answer.state)
            assert calls[(tenant, q)] == 1, (tenant, q)
        answers = await sc.gather([sc.probe(session, owner, q) for q, owner in owners.items()])
        assert {a.state for a in answers} == {"exact"}

        # 4. storm: random tenants, random variants, JSON or streamed, all at once; everything
        # is cached by now, so every probe is a hit on the asker's own entries
        before = len(fake.seen)
        storm_probes = []
        for _ in range(storm):
            tenant = sc.rng.choice(TENANTS)
            q = sc.rng.choice(common)
            q = paraphrase(q) if sc.rng.random() < 0.3 else q
            storm_probes.append(sc.probe(session, tenant, q, stream=sc.rng.random() < 0.3))
        answers = await sc.gather(storm_probes)
        assert {a.state for a in answers} <= {"exact", "semantic"}
        assert len(fake.seen) == before
    return sc


async def _stores(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("semcache_cache_store_total{"))


async def _wait_stores(session: aiohttp.ClientSession, url: str, count: float) -> None:
    """Answers are stored after they are sent: wait until ``count`` stores were tried."""
    for _ in range(500):
        if await _stores(session, url) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("answers were not stored in time")


def assert_isolated(sc: Scenario) -> None:
    tally = sc.tally
    assert not tally.failures, tally.failures[:10]
    assert not tally.wrong_tenant, \
        f"{len(tally.wrong_tenant)} cross-tenant answers: {tally.wrong_tenant[:10]}"
    # positive controls really hit, exactly and by similarity, and coalesced
    assert tally.states["exact"] > 0 and tally.states["semantic"] > 0 and tally.states["coalesced"] > 0, \
        tally.states


def passthrough_auth() -> dict[str, str]:
    return {tenant: f"Bearer sk-{tenant}-{random.getrandbits(48):012x}" for tenant in TENANTS}


def test_passthrough_tenants_never_share_answers(make_proxy: Any,
                                                 tagging_upstream: tuple[TaggingUpstream, str]) -> None:
    fake, upstream_url = tagging_upstream
    url = make_proxy(backends=backend(upstream_url), cache=RELAXED)
    auth = passthrough_auth()
    sc = run(isolation_run(url, fake, auth, questions=200, private=96, storm=5500))
    assert_isolated(sc)
    assert sc.tally.probes >= 10_000, sc.tally.probes
    # pass-through: each call went upstream with the asking tenant's own key, never another's
    for tag, _, sent in fake.seen:
        assert sent == auth[tag], (tag, sent)


def test_keys_mode_tenants_never_share_answers(make_proxy: Any,
                                               tagging_upstream: tuple[TaggingUpstream, str]) -> None:
    fake, upstream_url = tagging_upstream
    keys = {tenant: f"pk-{tenant}-{random.getrandbits(64):016x}" for tenant in TENANTS}
    url = make_proxy(backends=backend(upstream_url), cache=RELAXED, tenancy={"mode": "keys", "keys": [
        {"tenant": tenant, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        for tenant, key in keys.items()]})
    sc = run(isolation_run(url, fake, {t: f"Bearer {k}" for t, k in keys.items()},
                           questions=40, private=48, storm=400, seed=11))
    assert_isolated(sc)
    # the proxy key is the proxy's business: it never goes upstream
    assert all(sent is None for _, _, sent in fake.seen)


@pytest.mark.slow
def test_passthrough_isolation_long(make_proxy: Any, tagging_upstream: tuple[TaggingUpstream, str]) -> None:
    fake, upstream_url = tagging_upstream
    url = make_proxy(backends=backend(upstream_url), cache=RELAXED)
    sc = run(isolation_run(url, fake, passthrough_auth(), questions=200, private=96, storm=30_000,
                           seed=3), timeout=1800)
    assert_isolated(sc)


# -- 2. no oracle ---------------------------------------------------------------------------------

ORACLE_PROBES: tuple[tuple[str, dict[str, Any], dict[str, str]], ...] = (
    ("exact", {"messages": [{"role": "user", "content": QUESTIONS[0]}]}, {}),
    ("again", {"messages": [{"role": "user", "content": QUESTIONS[0]}]}, {}),
    ("paraphrase", {"messages": [{"role": "user", "content": paraphrase(QUESTIONS[1])}]}, {}),
    ("original", {"messages": [{"role": "user", "content": QUESTIONS[1]}]}, {}),
    ("stream", {"messages": [{"role": "user", "content": QUESTIONS[2]}], "stream": True}, {}),
    ("stream again", {"messages": [{"role": "user", "content": QUESTIONS[2]}], "stream": True}, {}),
    ("threshold", {"messages": [{"role": "user", "content": paraphrase(QUESTIONS[3])}]},
     {"x-semcache-threshold": "0.5"}),
    ("no-cache", {"messages": [{"role": "user", "content": QUESTIONS[4]}]}, {"Cache-Control": "no-cache"}),
    ("completions", {"prompt": QUESTIONS[5]}, {}),
    ("upstream error", {"messages": [{"role": "user", "content": "FAULT:500 " + QUESTIONS[6]}]}, {}),
    ("private", {"messages": [{"role": "user", "content": PRIVATE[0]}]}, {}),
)
HIDDEN_HEADERS = {"date", "content-length", "server"}


def _observed(answer: Answer) -> tuple[Any, ...]:
    """What a client can see of an answer, less what differs by time and call count (timing is
    out of scope: docs/security.md)."""
    try:
        data = orjson.loads(answer.body) if not answer.body.startswith(b"data:") else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        for key in ("id", "created", "system_fingerprint"):
            data.pop(key, None)
    headers = {k: v for k, v in answer.headers.items() if k not in HIDDEN_HEADERS}
    return (answer.status, sorted(headers.items()), answer.content, answer.done,
            orjson.dumps(data, option=orjson.OPT_SORT_KEYS) if data is not None else None)


async def _stored(session: aiohttp.ClientSession, url: str, body: dict[str, Any], auth: str,
                  within_s: float = 2.0) -> None:
    """Wait until the answer just given is stored and indexed (answers are stored after they
    are sent: on a loaded machine a fixed pause was not always enough), or ``within_s`` passed
    (probes whose answers are never stored: the upstream error, the bodies explain refuses)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        async with session.post(url + "/admin/cache/explain", json=body,
                                headers={"Authorization": auth}) as resp:
            if resp.status != 200:
                return
            found = await resp.json()
        if found.get("exact_hit") and (not found.get("semantic")
                                       or any(n.get("key") == found.get("key")
                                              for n in found.get("neighbours", []))):
            return
        await asyncio.sleep(0.05)


async def _oracle_run(url: str, prime: bool) -> tuple[list[Answer], list[Answer]]:
    """Alpha primes the cache with everything bravo will ask (or nothing), then bravo asks."""
    primed: list[Answer] = []
    seen: list[Answer] = []
    async with aiohttp.ClientSession() as session:
        if prime:
            for _, body, headers in ORACLE_PROBES:
                for extra in ({}, {"stream": True}):
                    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                    primed.append(await ask(session, url, {"model": MODEL, **body, **extra},
                                            {"Authorization": ALPHA, "User-Agent": "bravo", **headers},
                                            path=path))
            # and every paraphrase bravo might be served from
            for q in QUESTIONS[:8]:
                primed.append(await ask(session, url, {"model": MODEL, "messages": [
                    {"role": "user", "content": paraphrase(q)}]},
                    {"Authorization": ALPHA, "User-Agent": "bravo"}))
        for _, body, headers in ORACLE_PROBES:
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            seen.append(await ask(session, url, {"model": MODEL, **body},
                                  {"Authorization": BRAVO, "User-Agent": "bravo", **headers}, path=path))
            await _stored(session, url, {"model": MODEL, **body}, BRAVO)
        seen.append(await ask(session, url, {"model": MODEL, "messages": "not a list"},
                              {"Authorization": BRAVO}))
    return primed, seen


ALPHA = "Bearer sk-alpha-oracle-0001"
BRAVO = "Bearer sk-bravo-oracle-0002"


def test_what_bravo_sees_does_not_depend_on_alphas_prompts(
        make_proxy: Any, tagging_upstream: tuple[TaggingUpstream, str], tmp_path: Path) -> None:
    """Two fresh proxies; in the first, alpha asks everything bravo will ask (tagged as bravo's
    answers, JSON and streamed, paraphrases too) before bravo does. Bravo's statuses, headers
    (x-semcache, x-semcache-similarity, ...) and bodies are the same in both."""
    _, upstream_url = tagging_upstream
    primed_url = make_proxy(backends=backend(upstream_url))
    clean_url = make_proxy(backends=backend(upstream_url))
    primed, with_alpha = run(_oracle_run(primed_url, prime=True))
    _, alone = run(_oracle_run(clean_url, prime=False))
    assert [a.status for a in primed].count(200) >= len(primed) - 2   # the FAULT:500 pair
    for (name, _, _), a, b in zip(ORACLE_PROBES, with_alpha, alone, strict=False):
        assert _observed(a) == _observed(b), name
    assert _observed(with_alpha[-1]) == _observed(alone[-1])
    states = [a.state for a in with_alpha]
    assert states[:6] == ["miss", "exact", "miss", "semantic", "miss", "exact"], states

    # the cache key, the scope and the tenant id are never handed to a client
    secret = bytes.fromhex((tmp_path / "data0" / "tenant.key").read_text().strip())
    rules = make_policy(Config()).rules
    secrets_seen: set[str] = set()
    for auth in (ALPHA, BRAVO):
        tenant = identify(auth, TenancyConfig(), secret).tenant
        secrets_seen.add(tenant.removeprefix("h:"))
        for _, body, _ in ORACLE_PROBES:
            route = "completions" if "prompt" in body else "chat"
            the_plan = plan({"model": MODEL, **body}, tenant=tenant, route=route, directives=Directives(),
                            rules=rules)
            secrets_seen |= {the_plan.key, the_plan.scope}
    metrics = requests.get(primed_url + "/metrics", timeout=10).text
    everything = [a.body.decode(errors="replace") + repr(sorted(a.headers.items()))
                  for a in (*primed, *with_alpha)] + [metrics]
    for text in everything:
        for secret_value in secrets_seen:
            assert secret_value not in text
