"""Hit guards (proxy/guards.py): table-driven cases per guard, fires / does not fire."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from proxy import guards
from proxy.guards import (
    ALL_GUARDS,
    DEFAULT_GUARDS,
    GUARDS,
    NO_GUARDS,
    Guards,
    analyse,
    antonyms_swapped,
    check,
    entities_differ,
    fired,
    negation_differs,
    numbers_differ,
    order_swapped,
    time_sensitive,
    unmatched_entities,
)

Case = tuple[str, str]


def ids(cases: list[Case]) -> list[str]:
    return [f"{a} | {b}" for a, b in cases]


# ------------------------------------------------------------------------------------------------
# numbers

NUMBERS_FIRE: list[Case] = [
    ("How do I learn Python 3?", "How do I learn Python 2?"),
    ("Who won the Super Bowl in 2009?", "Who won the Super Bowl in 2014?"),
    ("What is the solution to Lesson 3 Question 6?", "What is the solution to Lesson 14 Question 6?"),
    ("What does 0.080 inches of rain feel like?", "What does 0.020 inches of rain feel like?"),
    ("Interest rates are 10%", "Interest rates are 6%"),
    ("When is the next batch after October?", "When is the next batch after October 17th?"),
    ("If you could keep five possessions, what would they be?", "If you could keep three possessions?"),
    ("How tall is a two storey house?", "How tall is a 3 storey house?"),
    ("What changed in version 1.2.3?", "What changed in version 1.2.4?"),
    ("Is 1,000 a lot?", "Is 10,000 a lot?"),
    ("What should I know in my twenties?", "What should I know in my forties?"),
    ("Is 25 old?", "Is twenty-six old?"),
    ("What is one sentence that changed your life?", "What are three sentences that changed your life?"),
    ("The 1st time I flew", "The third time I flew"),
    ("How do I earn millions?", "How do I earn thousands?"),
]
NUMBERS_QUIET: list[Case] = [
    ("How much is 1,000 USD in INR?", "How much is 1000 USD in INR?"),
    ("Is 3.0 enough?", "Is 3 enough?"),
    ("Is 2.50 the price?", "Is 2.5 the price?"),
    ("What happened in the 3rd round?", "What happened in round 3?"),
    ("How do I lose 5 kg?", "How do I lose 5kg?"),
    ("Which one is the best?", "Which is the best?"),
    ("Is one year enough?", "Is 1 year enough?"),
    ("What is the first thing to learn?", "What is the 1st thing to learn?"),
    ("What is a zero sum game?", "What is a zero-sum game?"),
    ("What is infinity divided by 0?", "What is infinity divided by zero?"),
    ("Is 25 old?", "Is twenty-five old?"),
    ("What are 2 good books?", "What are two good books?"),
    ("What is 50%?", "What is 50 percent?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("Four of a kind in a deck of 52 (four cards)", "four of a kind in a deck of 52 cards"),
]


@pytest.mark.parametrize(("a", "b"), NUMBERS_FIRE, ids=ids(NUMBERS_FIRE))
def test_numbers_fire(a: str, b: str) -> None:
    assert numbers_differ(a, b)
    assert numbers_differ(b, a)


@pytest.mark.parametrize(("a", "b"), NUMBERS_QUIET, ids=ids(NUMBERS_QUIET))
def test_numbers_quiet(a: str, b: str) -> None:
    assert not numbers_differ(a, b)
    assert not numbers_differ(b, a)


def test_numbers_are_normalised() -> None:
    assert analyse("1,000 and 3.0 and 1.50 and 007 and 1.2.3 and 3rd and 5%").numbers == (
        "1.2.3", "1.5", "1000", "3", "3", "5", "7")
    assert analyse("one first second").numbers == ()
    assert analyse("one first second").soft_numbers == ("1", "1", "2")


# ------------------------------------------------------------------------------------------------
# negation

NEGATION_FIRE: list[Case] = [
    ("Is it safe to eat eggs?", "Is it not safe to eat eggs?"),
    ("Why do people like Trump?", "Why don't people like Trump?"),
    ("Why do people like Trump?", "Why dont people like Trump?"),
    ("Why do people like Trump?", "Why don’t people like Trump?"),
    ("Can I change my MAC address after rooting?", "Can I change my MAC address without rooting?"),
    ("Is there a way to stop it?", "Is there no way to stop it?"),
    ("Have you ever lied?", "Have you never lied?"),
    ("Can I do it?", "I cannot do it, why?"),
    ("Who likes him?", "Nobody likes him, why?"),
]
NEGATION_QUIET: list[Case] = [
    ("Is it safe to eat eggs?", "Is eating eggs safe?"),
    ("Why don't cats like water?", "Why do cats not like water?"),
    ("Why can't I sleep?", "Why cannot I sleep?"),
    ("Is it not only fast but also cheap?", "Is it fast and also cheap?"),
    ("Who is the No. 1 player?", "Who is the number 1 player?"),
    ("Isn't it true that it isn't raining?", "Is it true that it is raining?"),   # two negations
]


@pytest.mark.parametrize(("a", "b"), NEGATION_FIRE, ids=ids(NEGATION_FIRE))
def test_negation_fires(a: str, b: str) -> None:
    assert negation_differs(a, b)
    assert negation_differs(b, a)


@pytest.mark.parametrize(("a", "b"), NEGATION_QUIET, ids=ids(NEGATION_QUIET))
def test_negation_quiet(a: str, b: str) -> None:
    assert not negation_differs(a, b)


# ------------------------------------------------------------------------------------------------
# antonyms

ANTONYMS_FIRE: list[Case] = [
    ("What is the best gift you've ever given?", "What is the best gift you've ever received?"),
    ("Should I buy bitcoin now?", "Should I sell bitcoin now?"),
    ("What to do before an interview?", "What to do after an interview?"),
    ("How do I increase my metabolism?", "How do I decrease my metabolism?"),
    ("What is the best movie of 2016?", "What is the worst movie of 2016?"),
    ("Which country has the highest tax rate?", "Which country has the lowest tax rate?"),
    ("How do I import a CSV into Excel?", "How do I export a CSV from Excel?"),
    ("What is the first step?", "What is the last step?"),
    ("Can I have a boyfriend before marriage?", "Can I have a girlfriend before marriage?"),
    ("What is the maximum value?", "What is the minimum value?"),
    ("How do I upload photos?", "How do I download photos?"),
]
ANTONYMS_QUIET: list[Case] = [
    ("What is the best gift you've ever given?", "What's the best present you have ever given?"),
    ("What is the difference between buy and sell orders?", "Buy vs sell orders: what is the difference?"),
    ("Which is better, more RAM or a faster CPU?", "More RAM or a faster CPU: which is better?"),
    ("What is the capital of France?", "What's the capital of France?"),
]


@pytest.mark.parametrize(("a", "b"), ANTONYMS_FIRE, ids=ids(ANTONYMS_FIRE))
def test_antonyms_fire(a: str, b: str) -> None:
    assert antonyms_swapped(a, b)
    assert antonyms_swapped(b, a)


@pytest.mark.parametrize(("a", "b"), ANTONYMS_QUIET, ids=ids(ANTONYMS_QUIET))
def test_antonyms_quiet(a: str, b: str) -> None:
    assert not antonyms_swapped(a, b)


# ------------------------------------------------------------------------------------------------
# entities and identifiers

ENTITIES_FIRE: list[Case] = [
    ("President of Pakistan", "President of India"),
    ("Who is the President of Pakistan?", "Who is the President of India?"),
    ("Which rehab center is near Early County GA?", "Which rehab center is near Upson County GA?"),
    ("How do I learn C#?", "How do I learn C++?"),
    ("How do I call my_func from Python?", "How do I call other_func from Python?"),
    ("Why does import numpy fail on v1.2?", "Why does import numpy fail on v2.0?"),
    ("How do I open report.pdf?", "How do I open invoice.pdf?"),
    ("Email alice@example.com about it", "Email bob@example.com about it"),
    ("What is the best phone from Apple?", "What is the best phone from Samsung?"),
    ("What is SQL used for?", "What is CSS used for?"),
    ("How good is the iPhone camera?", "How good is the iPad camera?"),
    ("Is October a good time to visit Sri Lanka?", "Is November a good time to visit Sri Lanka?"),
    ("What are the best restaurants in Bihar?", "What are the best restaurants in Munger, Bihar?"),  # more
    ("How do I get a job in RBI?", "How do I get a job in RBI/SEBI?"),
    ("Best orphanages in New York?", "Best orphanages in New York City?"),
]
ENTITIES_QUIET: list[Case] = [
    ("What is the capital of France?", "What's the capital of France?"),
    ("How do I install node.js on Ubuntu?", "How do I install Node.js on ubuntu?"),
    ("How do I install Node.js?", "How do I install nodejs?"),
    ("Why is India's economy growing?", "Why is the Indian economy growing?"),
    ("Will political correctness kill America?", "Will political correctness kill the US?"),
    ("What are the best German beers sold in the U.S.?", "What are the best German beers sold in the USA?"),
    ("Why do so many people hate Hilary Clinton?", "Why do so many people dislike Hillary Clinton?"),
    ("What Is The Best Way To Learn Guitar?", "How can I learn guitar fast?"),   # Title Case says nothing
    ("HOW DO I LEARN GUITAR?", "How do I learn guitar?"),                        # neither does SHOUTING
    ("I think I should go. What do I do?", "What do I do? I think I should go."),
    ("Does Jayalalithaa deserve Bharat Ratna?", "Do you think Jayalalithaa deserves a Bharat Ratna?"),
    ("Is Daenerys a Targaryen?", "Is deanerys a targaryen?"),                  # a one-letter slip
    ("Why do the Nazis hate Jews?", "Why did the Nazis hate Jewish people?"),
    ("How do I learn Python 3?", "How do I learn Python 2?"),    # a plain number is the numbers guard's
]


@pytest.mark.parametrize(("a", "b"), ENTITIES_FIRE, ids=ids(ENTITIES_FIRE))
def test_entities_fire(a: str, b: str) -> None:
    assert entities_differ(a, b)
    assert entities_differ(b, a)


@pytest.mark.parametrize(("a", "b"), ENTITIES_QUIET, ids=ids(ENTITIES_QUIET))
def test_entities_quiet(a: str, b: str) -> None:
    assert not entities_differ(a, b)
    assert not entities_differ(b, a)


def test_unmatched_entities_names_them() -> None:
    assert unmatched_entities("Who is the President of Pakistan?", "Who is the President of India?") == (
        ["Pakistan"], ["India"])
    assert unmatched_entities("Best restaurants in Munger, Bihar?", "Best restaurants in Bihar?") == (
        ["Munger"], [])


def test_sentence_starts_and_common_capitals_are_not_entities() -> None:
    assert analyse("Pakistan is big. India is bigger. I am here").entities == ()
    assert analyse("Is NASA funded by Congress?").entities == ("NASA", "Congress")


# ------------------------------------------------------------------------------------------------
# time-sensitive: the query alone decides

TIME_FIRE = [
    "What's the weather today?",
    "What is the latest iPhone?",
    "Who is winning right now?",
    "What is the current price of gold?",
    "What happened this week?",
    "Any news on the election?",
    "What is the price of bitcoin?",
    "Which stocks should I buy?",
    "What's on tonight?",
    "What did the president say yesterday?",
    "Is it going to rain tomorrow?",
    "Who is currently the CEO of Twitter?",
    "What are today's headlines?",
    "What are recent advances in AI?",
    "What is the exchange rate of USD to EUR?",
    "Is it open at the moment?",
]
TIME_QUIET = [
    "What is the capital of France?",
    "What is the difference between a current account and a savings account?",
    "How do I know if she likes me?",
    "Why did Arnab Goswami quit Times Now?",
    "What is a stockade?",
    "How does an electric current work?",
]


@pytest.mark.parametrize("query", TIME_FIRE)
def test_time_sensitive_fires(query: str) -> None:
    assert time_sensitive(query, "What is the capital of France?")


@pytest.mark.parametrize("query", TIME_QUIET)
def test_time_sensitive_quiet(query: str) -> None:
    assert not time_sensitive(query, "What's the weather today?")      # the candidate is not read


# ------------------------------------------------------------------------------------------------
# order

ORDER_FIRE: list[Case] = [
    ("Do guys like introvert girls?", "Do girls like introvert guys?"),
    ("Why do guys like introvert girls?", "Why do girls like introvert guys?"),
    ("Why do Indians hate Pakistanis?", "Why do Pakistanis hate Indians?"),
    ("Is it safe to drive from Texas to California?", "Is it safe to drive from California to Texas?"),
    ("Is Java faster than Python?", "Is Python faster than Java?"),
    ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?"),
]
ORDER_QUIET: list[Case] = [
    ("What is the difference between a cat and a dog?", "What is the difference between a dog and a cat?"),
    ("Which is better, Java or Python?", "Which is better, Python or Java?"),
    ("When will the housing bubble burst in the Bay Area?",
     "When will the housing bubble in the Bay Area burst?"),
    ("How does selling on eBay work?", "How does selling work on eBay?"),
    ("Which laptop I should buy?", "Which laptop should I buy?"),
    ("How much water a day do I need to drink?", "How much water should I drink a day?"),
    ("What is the capital of France?", "What's the capital of France?"),
]


@pytest.mark.parametrize(("a", "b"), ORDER_FIRE, ids=ids(ORDER_FIRE))
def test_order_fires(a: str, b: str) -> None:
    assert order_swapped(a, b)
    assert order_swapped(b, a)


@pytest.mark.parametrize(("a", "b"), ORDER_QUIET, ids=ids(ORDER_QUIET))
def test_order_quiet(a: str, b: str) -> None:
    assert not order_swapped(a, b)
    assert not order_swapped(b, a)


# ------------------------------------------------------------------------------------------------
# Chinese: negation (不/没/没有/未/别/无/非) and order around a directed word (到/比/喜欢/变成 ...)

ZH_NEGATION_FIRE = [
    ("苹果越狱怎么改字体", "苹果没越狱怎么改字体"),
    ("这个药可以吃", "这个药不可以吃"),
    ("他来了吗", "他没有来吗"),
    ("下雨天出门", "下雨天别出门"),
    ("手机已激活", "手机未激活"),
]
ZH_NEGATION_QUIET = [
    ("这个好不好", "这个好吗"),                     # A-not-A: a question, not a negation
    ("能不能退款", "可以退款吗"),
    ("现在的快递公司都上班了没", "快递公司现在上班了么"),   # a closing 了没 asks
    ("这家店不错", "这家店很好"),                   # 不错 = good
    ("非常喜欢这首歌", "很喜欢这首歌"),              # 非常 = very
    ("别人怎么看", "其他人怎么看"),                 # 别人 = others
    ("未来的工作", "将来的工作"),                   # 未来 = future
    ("他不来", "他没有来"),                         # both negated
    ("男女区别是什么", "男女有什么不同"),           # 区别 / 不同 = difference
]
ZH_ORDER_FIRE = [
    ("重庆到西安的火车票", "西安到重庆的火车票"),
    ("左脸比右脸大", "右脸比左脸大"),
    ("张翰喜欢郑爽吗", "郑爽喜欢张翰吗"),
    ("冰变成水", "水变成冰"),
    ("唐嫣喜欢谁", "谁喜欢唐嫣"),
    ("财付通转账到支付宝", "支付宝转账到财付通"),
]
ZH_ORDER_QUIET = [
    ("重庆到西安怎么坐车", "怎么坐车重庆到西安"),    # the same route, said in another order
    ("猫和狗的区别", "狗和猫的区别"),               # 和 is symmetric
    ("如何重置密码", "重置密码如何"),
    ("重庆到西安的火车票", "重庆到西安的火车票"),
    ("北京到上海", "北京到上海多远"),
]


@pytest.mark.parametrize(("a", "b"), ZH_NEGATION_FIRE, ids=ids(ZH_NEGATION_FIRE))
def test_chinese_negation_fires(a: str, b: str) -> None:
    assert negation_differs(a, b) and negation_differs(b, a)
    assert check(a, b) == "negation"


@pytest.mark.parametrize(("a", "b"), ZH_NEGATION_QUIET, ids=ids(ZH_NEGATION_QUIET))
def test_chinese_negation_quiet(a: str, b: str) -> None:
    assert not negation_differs(a, b) and not negation_differs(b, a)


@pytest.mark.parametrize(("a", "b"), ZH_ORDER_FIRE, ids=ids(ZH_ORDER_FIRE))
def test_chinese_order_fires(a: str, b: str) -> None:
    assert order_swapped(a, b) and order_swapped(b, a)


@pytest.mark.parametrize(("a", "b"), ZH_ORDER_QUIET, ids=ids(ZH_ORDER_QUIET))
def test_chinese_order_quiet(a: str, b: str) -> None:
    assert not order_swapped(a, b) and not order_swapped(b, a)


def test_chinese_text_leaves_the_english_rules_alone() -> None:
    reading = analyse("怎么安装 Python 3 呢")
    assert reading.han == "怎么安装呢"
    assert reading.content == ("python",)                 # a run of ideographs is not a word
    assert reading.numbers == ("3",)


# ------------------------------------------------------------------------------------------------
# check() and the configuration

CHECK: list[tuple[str, str, str | None]] = [
    ("What is the best gift you've ever given?", "What is the best gift you've ever received?", "antonyms"),
    ("What is the capital of France?", "What's the capital of France?", None),
    ("President of Pakistan", "President of India", "entities"),
    ("How do I learn Python 3?", "How do I learn Python 2?", "numbers"),
    ("Is it safe to eat eggs?", "Is it not safe to eat eggs?", "negation"),
    ("What's the weather today?", "What is the weather like today?", "time_sensitive"),
    ("Do guys like introvert girls?", "Do girls like introvert guys?", "order"),
    ("How can I learn to program in C#?", "How can I master C#?", None),
    ("What's the best morning routine?", "What is the best morning routine?", None),
]


@pytest.mark.parametrize(("query", "candidate", "expected"), CHECK, ids=[f"{q} | {c}" for q, c, _ in CHECK])
def test_check_names_the_guard(query: str, candidate: str, expected: str | None) -> None:
    assert check(query, candidate, ALL_GUARDS) == expected
    assert check(query, candidate) == expected                      # every guard is on by default
    assert check(query, candidate, NO_GUARDS) is None


def test_check_runs_guards_in_order_and_honours_switches() -> None:
    query, candidate = "What's the weather in Paris today?", "What's the weather in London today?"
    assert fired(query, candidate) == ("time_sensitive", "entities")
    assert check(query, candidate) == "time_sensitive"
    assert check(query, candidate, Guards(time_sensitive=False)) == "entities"
    assert check(query, candidate, Guards.only("numbers", "negation")) is None


def test_guards_config() -> None:
    assert tuple(GUARDS) == ALL_GUARDS.enabled == tuple(
        f.name for f in dataclasses.fields(Guards) if f.name != "verifier")
    assert Guards.only("numbers", "verifier").enabled == ("numbers",)   # the model is attached apart
    assert NO_GUARDS.enabled == ()
    assert Guards.only("entities").enabled == ("entities",)
    assert set(DEFAULT_GUARDS.enabled) <= set(GUARDS)
    with pytest.raises(ValueError, match="unknown guards"):
        Guards.only("spelling")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ALL_GUARDS.numbers = False  # type: ignore[misc]


def test_every_guard_is_quiet_on_identical_prompts() -> None:
    for text in ("Is it not safe to eat 3 eggs in Paris before 2020?", "", "???", "x" * 5000):
        for name in ("numbers", "negation", "antonyms", "entities", "order"):
            assert not GUARDS[name](text, text), (name, text)


def test_long_and_odd_input_is_handled() -> None:
    long_text = "Is it safe to eat eggs in Paris? " * 500                  # not memoised: > 2,000 chars
    assert check(long_text, long_text.replace("Paris", "London")) == "entities"
    assert check("", "") is None
    assert check("什么是机器学习？", "机器学习是什么？") is None
    assert check("🙂🙂", "🙃") is None


def test_module_is_pure() -> None:
    """stdlib only, nothing from the rest of the proxy, no I/O."""
    tree = ast.parse(Path(guards.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add((node.module or "").split(".")[0])
    assert imported <= sys.stdlib_module_names | {"__future__"}
    assert not imported & {"os", "io", "pathlib", "socket", "subprocess", "asyncio", "logging", "time"}
    source = Path(guards.__file__).read_text(encoding="utf-8")
    assert "open(" not in source and "print(" not in source
