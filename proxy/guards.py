"""Guards that refuse a semantic hit whose cached prompt means something else.

A sentence embedding scores "the best gift you've ever *given*" and "... *received*" at 0.99, and
"President of Pakistan" close to "President of India": cosine similarity is blind to exactly the
small words that flip an answer. Each guard here compares the new prompt (``query``) with the
prompt of the best cached entry (``candidate``) and returns True to *refuse* the hit:

=================  =========================================================================
``time_sensitive``  the query asks about now ("today", "latest", "weather", "price of" ...)
``numbers``         the numbers differ ("Python 3" / "Python 2", "1,000" = "1000", "3.0" = "3")
``negation``        one side is negated and the other is not ("is it safe" / "is it not safe")
``antonyms``        one side uses a direction word, the other its opposite (given / received)
``entities``        names or identifiers differ ("Pakistan" / "India", ``foo_bar``, ``v1.2``)
``order``           same content words in another order ("guys like girls" / "girls like guys")
=================  =========================================================================

Everything is pure and deterministic (stdlib only, no I/O), so the cache can call :func:`check`
inline on the event loop. Each prompt is read once into an :class:`Analysis` (about 40 µs for a
question; memoised for prompts up to 2,000 characters, so a candidate checked again costs almost
nothing); a check of two fresh questions costs about 80 µs, and grows linearly with length (about
1 µs per character), which is why it should only see prompts the embedder accepted. The guards
are built for English; ``negation`` and ``order`` also read Chinese (negation characters, and
the two sides of a directed word such as 到 / 比 / 喜欢 trading places); on other languages they
mostly stay silent (digits and Latin-script identifiers still count). After the guards, an
attached verifier (``proxy/verifier.py``) may refuse too, as ``"verifier"``.

Measured with ``bench/guard_eval.py`` on the QQP tuning pairs (all-MiniLM-L6-v2): at equal recall
all guards together lower the false-hit rate FP/(TP+FP) by a quarter to a third (at 20% recall
from 11.1% to 7.9%); at the threshold 0.97 from 9.1% to 6.2% for 0.6 points of recall. Every guard
refuses hits that are wrong more often than the hits a stricter threshold gives up, so
:data:`DEFAULT_GUARDS` has them all on. None of this reaches a 1% false-hit rate on those pairs.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ALL_GUARDS",
    "DEFAULT_GUARDS",
    "GUARDS",
    "NO_GUARDS",
    "Analysis",
    "GuardFn",
    "Guards",
    "SecondStage",
    "analyse",
    "antonyms_swapped",
    "check",
    "entities_differ",
    "fired",
    "negation_differs",
    "numbers_differ",
    "on_analyses",
    "order_swapped",
    "time_sensitive",
    "unmatched_entities",
]

GuardFn = Callable[[str, str], bool]

# --------------------------------------------------------------------------------------------
# Tokens

def _split(words: str) -> list[str]:
    return words.split()


#: a word: letters/digits with inner apostrophes, dots, hyphens, slashes, ``@ : + # &`` kept
#: (``don't``, ``node.js``, ``e-mail``, ``a@b.com``, ``C++``, ``C#``, ``src/main.py``)
_TOKEN = re.compile(r"\w(?:[\w'.\-/@:+#&]*[\w+#])?")
#: "end.Next" (a missing space after a full stop) is two words, "ASP.NET" / "Node.js" one
_GLUED_SENTENCE = re.compile(r"\.(?=[A-Z][a-z])")
_ENDS = frozenset(".!?\n;")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_DOTTED = re.compile(r"\w\.\w")

_STOPWORDS = frozenset(_split("""
a about above across after again against all almost also although always am among an and another any
anyone anything are around as at be became because become been before being below between both but by
can could did do does doing done down during each either else enough even ever every everyone
everything few for from further get gets getting got had has have having he her here hers herself him
himself his how however i i'd i'll i'm i've if in into is it it's its itself just let like make many
may me might mine more most much must my myself near need neither no nor not now of off often on once
one only or other others our ours ourselves out over own per please quite rather really same several
shall she should since so some someone something still such than that the their theirs them
themselves then there these they this those though through thus to too toward towards under until up
upon us use used using very via vs want was we well were what whatever when where whether which while
who whom whose why will with within without would yet you your yours yourself yourselves
"""))

#: capitalised in running text without naming anything
_COMMON_CAPS = frozenset({"i", "i'd", "i'll", "i'm", "i've", "ok", "okay", "e.g", "i.e", "etc", "a.m", "p.m",
                          "vs", "mr", "mrs", "ms", "dr", "st", "hi", "hello", "thanks", "please"})


_GAP_TOKEN = re.compile(r"(\W*)(" + _TOKEN.pattern + ")")
_WORD_SLASH_WORD = re.compile(r"[^\W\d_]+(?:/[^\W\d_]+)+")


def _tokens(text: str) -> list[tuple[str, bool]]:
    """Words, each with whether it starts a sentence. "and/or", "RBI/SEBI" are two words;
    paths and URLs ("src/main.py", "http://x.org/a") stay whole."""
    prepared = _GLUED_SENTENCE.sub(". ", text.translate(_APOSTROPHES))
    out: list[tuple[str, bool]] = []
    for gap, word in _GAP_TOKEN.findall(prepared):
        start = not out or not _ENDS.isdisjoint(gap)
        if "/" in word and _WORD_SLASH_WORD.fullmatch(word):
            parts = word.split("/")
            out.append((parts[0], start))
            out.extend((part, False) for part in parts[1:])
        else:
            out.append((word, start))
    return out


def _key(word: str) -> str:
    """Matching key of a lower-cased word: no possessive, no plural ``s`` ("India's" = "india")."""
    if word.endswith("'s"):
        word = word[:-2]
    elif word.endswith("s'"):
        word = word[:-1]
    if len(word) > 3 and word.endswith("s") and word.isalpha():
        word = word[:-1]
    return word


#: squashed keys naming the same country
_ALIASES = {"us": "usa", "usa": "usa", "america": "usa", "unitedstate": "usa", "unitedstates": "usa",
            "uk": "britain", "britain": "britain", "greatbritain": "britain", "unitedkingdom": "britain"}
_PUNCT = re.compile(r"[^\w+#]|_")


def _squash(word: str) -> str:
    """No punctuation but ``+`` and ``#`` ("node.js" = "nodejs", "C++" stays apart from "C")."""
    return _PUNCT.sub("", word)


# --------------------------------------------------------------------------------------------
# Numbers

_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+(?![\d,])|\d+)((?:\.\d+)*)")
_SPELLED = {w: str(i) for i, w in enumerate(_split(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"))}
_SPELLED.update({w: str(i) for i, w in enumerate(_split(
    "_ _ _ third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth")) if w != "_"})
_SPELLED.update({w + "ies": v[:-1] + "0" for w, v in (
    ("twent", "20"), ("thirt", "30"), ("fort", "40"), ("fift", "50"), ("sixt", "60"), ("sevent", "70"),
    ("eight", "80"), ("ninet", "90"))})                  # "in his forties" = "in his 40s"
_SPELLED.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                 "eighty": "80", "ninety": "90", "hundred": "100", "hundreds": "100",
                 "thousand": "1000", "thousands": "1000", "million": "1000000",
                 "millions": "1000000", "billion": "1000000000", "billions": "1000000000",
                 "dozen": "12", "dozens": "12"})
#: words that are numbers only sometimes ("which one", "the first time", "a second"): they may
#: stand in for a digit on the other side but never make a difference on their own
_SOFT = {"one": "1", "first": "1", "second": "2"}
for _word in _SOFT:
    _SPELLED.pop(_word, None)
_TENS = {w: _SPELLED[w] for w in _split("twenty thirty forty fifty sixty seventy eighty ninety")}


def _number_value(whole: str, fraction: str) -> str:
    whole = whole.replace(",", "").lstrip("0") or "0"
    if fraction.count(".") > 1:                       # a version: 1.2.3
        return whole + fraction
    fraction = fraction.rstrip("0").rstrip(".")       # 3.0 -> 3, 2.50 -> 2.5
    return whole + fraction


def _numbers(text: str, lows: list[str]) -> tuple[Counter[str], Counter[str]]:
    hard: Counter[str] = Counter(_number_value(m[1], m[2]) for m in _NUMBER.finditer(text))
    soft: Counter[str] = Counter()
    for word in lows:
        if word in _SPELLED:
            hard[_SPELLED[word]] += 1
            continue
        if word in _SOFT:
            soft[_SOFT[word]] += 1
            continue
        if "-" not in word:
            continue
        parts = word.split("-")
        if len(parts) == 2 and parts[0] in _TENS and parts[1] in _SPELLED and len(_SPELLED[parts[1]]) == 1:
            hard[str(int(_TENS[parts[0]]) + int(_SPELLED[parts[1]]))] += 1      # twenty-five
            continue
        for low in parts:                                                       # zero-sum
            if low in _SPELLED:
                hard[_SPELLED[low]] += 1
            elif low in _SOFT:
                soft[_SOFT[low]] += 1
    return hard, soft


# --------------------------------------------------------------------------------------------
# Negation

_NEGATIONS = frozenset(_split("""
not no never none nobody nothing neither nor nowhere without cannot cant dont doesnt didnt isnt arent
wasnt werent wont wouldnt shouldnt couldnt havent hasnt hadnt mustnt neednt aint
"""))


def _negations(words: list[str], lows: list[str]) -> list[str]:
    found = []
    for i, low in enumerate(lows):
        if low in _NEGATIONS or low.endswith("n't"):
            if low == "no" and i + 1 < len(words) and words[i + 1][0].isdigit():
                continue                                   # "No. 1"
            if low == "not" and i + 1 < len(words) and lows[i + 1] == "only":
                continue                                   # "not only ... but also"
            found.append("not" if low.endswith(("n't", "nt")) or low == "cannot" else low)
    return found


# --------------------------------------------------------------------------------------------
# Opposites

_OPPOSITES: tuple[tuple[str, str], ...] = (
    ("give gives gave giving given giver", "receive receives received receiving receiver recipient"),
    ("buy buys bought buying buyer buyers", "sell sells sold selling seller sellers"),
    ("send sends sent sending sender", "receive receives received receiving receiver recipient"),
    ("lend lends lent lending lender", "borrow borrows borrowed borrowing borrower"),
    ("increase increases increased increasing", "decrease decreases decreased decreasing"),
    ("increase increases increased increasing", "reduce reduces reduced reducing"),
    ("gain gains gained gaining", "lose loses losing"),
    ("win wins won winning winner", "lose loses lost losing loser"),
    ("more", "less fewer"),
    ("most", "least fewest"),
    ("best", "worst"),
    ("better", "worse"),
    ("max maximum maximize maximise", "min minimum minimize minimise"),
    ("high higher highest", "low lower lowest"),
    ("first", "last"),
    ("start starts started starting", "end ends ended ending"),
    ("start starts started starting", "stop stops stopped stopping"),
    ("begin begins began beginning", "end ends ended ending"),
    ("before", "after"),
    ("above", "below"),
    ("import imports imported importing importer", "export exports exported exporting exporter"),
    ("male males", "female females"),
    ("man men", "woman women"),
    ("boy boys", "girl girls"),
    ("guy guys", "girl girls"),
    ("husband husbands", "wife wives"),
    ("boyfriend", "girlfriend"),
    ("father fathers dad", "mother mothers mom mum"),
    ("son sons", "daughter daughters"),
    ("brother brothers", "sister sisters"),
    ("employer employers", "employee employees"),
    ("teacher teachers", "student students"),
    ("parent parents", "child children kid kids"),
    ("upload uploads uploaded uploading", "download downloads downloaded downloading"),
    ("input inputs", "output outputs"),
    ("encrypt encrypts encrypted encrypting encryption", "decrypt decrypts decrypted decrypting decryption"),
    ("enable enables enabled enabling", "disable disables disabled disabling"),
    ("install installs installed installing", "uninstall uninstalls uninstalled uninstalling"),
    ("add adds added adding", "remove removes removed removing"),
    ("include includes included including", "exclude excludes excluded excluding"),
    ("push pushes pushed pushing", "pull pulls pulled pulling"),
    ("open opens opened opening", "close closes closed closing"),
    ("advantage advantages pros", "disadvantage disadvantages cons"),
    ("positive", "negative"),
    ("true", "false"),
    ("love loves loved", "hate hates hated"),
    ("rich richer richest", "poor poorer poorest"),
    ("cheap cheaper cheapest", "expensive"),
    ("easy easier easiest", "hard harder hardest difficult"),
    ("fast faster fastest", "slow slower slowest"),
    ("hot hotter hottest", "cold colder coldest"),
    ("big bigger biggest large larger largest", "small smaller smallest"),
    ("long longer longest", "short shorter shortest"),
    ("strong stronger strongest", "weak weaker weakest"),
    ("early earlier earliest", "late later latest"),
    ("old older oldest", "new newer newest young younger youngest"),
    ("north northern", "south southern"),
    ("east eastern", "west western"),
    ("top", "bottom"),
    ("success successful", "failure failed unsuccessful"),
    ("pass passed passing", "fail fails failed failing"),
    ("legal", "illegal"),
    ("possible", "impossible"),
    ("ascending", "descending"),
    ("inside", "outside"),
    ("internal", "external"),
    ("past", "future"),
    ("accept accepts accepted accepting", "reject rejects rejected rejecting"),
    ("agree agrees agreed", "disagree disagrees disagreed"),
    ("like likes liked", "dislike dislikes disliked"),
    ("happy", "sad unhappy"),
    ("good", "bad"),
)
_SIDES: dict[str, list[tuple[int, int]]] = {}
for _i, (_left, _right) in enumerate(_OPPOSITES):
    for _side, _forms in ((0, _left), (1, _right)):
        for _form in _forms.split():
            _SIDES.setdefault(_form, []).append((_i, _side))


def _opposites(lows: list[str]) -> frozenset[tuple[int, int]]:
    return frozenset(side for word in lows if word in _SIDES for side in _SIDES[word])


# --------------------------------------------------------------------------------------------
# Entities and identifiers


_HAS_DIGIT = re.compile(r"\d")
_PLAIN_NUMBER = re.compile(r"[\d,]+(?:\.\d+)?(?:st|nd|rd|th|s|%)?")


def _entities(tokens: list[tuple[str, bool]]) -> list[str]:
    """Names and identifiers: capitalised words past a sentence's first word, ALL-CAPS and
    mIxEd-case words, and tokens holding digits, underscores, dots, ``@`` or ``://``.

    Pure numbers are left to the numbers guard. In Title Case Or SHOUTED text capitalisation
    says nothing, so only identifiers (and ALL-CAPS words in title case) count there.
    """
    alpha = [(w, s) for w, s in tokens if w.isalpha() and not s]
    capitalised = sum(1 for w, _ in alpha if w[0].isupper())
    shouted = sum(1 for w, _ in alpha if w.isupper() and len(w) > 1)
    title_case = len(alpha) >= 3 and capitalised > 0.6 * len(alpha)
    shouting = len(alpha) >= 3 and shouted > 0.5 * len(alpha)

    found = []
    for word, start in tokens:
        if word.islower() and word.isalpha():
            continue                                        # the common case: a plain word
        low = word.lower()
        if low in _COMMON_CAPS or low in _STOPWORDS:
            continue
        if not word.isalpha():
            if _HAS_DIGIT.search(word):
                if not _PLAIN_NUMBER.fullmatch(low):        # a plain number is the numbers guard's
                    found.append(word)
            elif "_" in word or "@" in word or "://" in word or _DOTTED.search(word):
                found.append(word)
            elif word[0].isalpha() and word[0].isupper() and not start and not title_case and not shouting:
                found.append(word)                          # Coca-Cola, O'Neill
            continue
        if len(word) < 2 and not word.isupper():
            continue
        elif word[1:] != word[1:].lower() and not word.isupper():
            found.append(word)                              # iPhone, YouTube, getUserName
        elif word.isupper() and len(word) > 1:
            if not shouting:
                found.append(word)                          # NASA, SQL
        elif word[0].isupper() and not start and not title_case and not shouting:
            found.append(word)                              # Pakistan (not at a sentence start)
    return found


# --------------------------------------------------------------------------------------------
# Time

_NOW_WORDS = frozenset(_split("""
today tonight tomorrow yesterday now currently latest recent recently news headline headlines weather
forecast stock stocks up-to-date
"""))
_NOW_PAIRS = frozenset(
    [("current", w) for w in _split("""price prices rate rates news event events affairs status situation
     weather time date president prime ceo champion score scores temperature version value""")]
    + [("this", w) for w in _split("week weekend month year morning afternoon evening season quarter")]
    + [("price", "of"), ("prices", "of"), ("share", "price"), ("exchange", "rate"), ("exchange", "rates"),
       ("live", "score")])
_NOW_TRIPLES = frozenset({("at", "the", "moment"), ("up", "to", "date"), ("as", "of", "now")})


def _about_now(tokens: list[tuple[str, bool]], lows: list[str]) -> bool:
    for i, low in enumerate(lows):
        if low.endswith("'s"):
            low = low[:-2]
        if low in _NOW_WORDS:
            word, start = tokens[i]
            if word == "Now" and not start:
                continue                       # a name's last word: "Times Now", "Apocalypse Now"
            return True
        if i and (lows[i - 1], low) in _NOW_PAIRS:
            return True
        if i > 1 and (lows[i - 2], lows[i - 1], low) in _NOW_TRIPLES:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Chinese: the English rules split on spaces, so Chinese needs its own negation and order rules

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
#: negation characters and words (没有 counts once)
_ZH_NEGATION = re.compile(r"没有|[不没未别无非勿莫]")
#: words holding a negation character that negate nothing ("不错" good, "非常" very, "别人"
#: others, "未来" future ...); the A-not-A question (好不好 = 好吗) and a closing "了没" (did it?),
#: which ask, not negate
_ZH_NOT_NEGATION = re.compile(
    r"不错|不过|不少|不断|不同|差不多|不好意思|不得不|无论|无聊|无线|无人|非常|莫名|别人|别的|区别|分别|特别|"
    r"级别|类别|性别|识别|告别|别名|个别|鉴别|辨别|派别|未来|无限|无数|并且|是非|除非|"
    r"([\u4e00-\u9fff])[不没]\1|[了过]没(?=[？?吗呢啊]|$)")
#: words that give a sentence a direction: the two sides around one of them may not trade
#: places ("重庆到西安" / "西安到重庆", "左脸比右脸大", "张翰喜欢郑爽"); longest first. Not the
#: symmetric ones (和, 与, 跟, 区别): "A和B的区别" = "B和A的区别"
_ZH_DIRECTED = ("转账到", "转到", "变成", "变为", "喜欢", "讨厌", "大于", "小于", "多于", "少于",
                "到", "比", "给", "向", "往", "爱", "嫁", "娶", "转", "送", "借", "欠", "打", "赢", "输")


def _zh_negations(han: str, text: str) -> list[str]:
    if not han:
        return []
    plain = _ZH_NOT_NEGATION.sub("", text)
    return ["不" for _ in _ZH_NEGATION.finditer(plain)]


def _zh_swapped(a: str, b: str) -> bool:
    """The same characters, and the two sides of a directed word (到, 比, 喜欢 ...) trade places."""
    if a == b or len(a) != len(b) or sorted(a) != sorted(b):
        return False
    for word in _ZH_DIRECTED:
        if a.count(word) == 1 and b.count(word) == 1:
            before_a, _, after_a = a.partition(word)
            before_b, _, after_b = b.partition(word)
            return (bool(before_a) and bool(before_b) and before_a[-2:] != before_b[-2:]
                    and after_a[:2] != after_b[:2])
    return False


# --------------------------------------------------------------------------------------------
# Analysis (memoised: the cache checks the same candidate prompt again and again)


@dataclass(frozen=True)
class Analysis:
    """What the guards read from one prompt."""

    text: str
    words: tuple[str, ...]
    word_keys: frozenset[str]            # matching keys of the words (see _key)
    keys: frozenset[str]                 # ... and of adjacent words joined, squashed forms
    aliases: frozenset[str]              # "usa" for US / U.S.A. / America / United States ...
    about_now: bool                      # asks about the present (see time_sensitive)
    numbers: tuple[str, ...]             # normalised numbers that always count, sorted, with repeats
    soft_numbers: tuple[str, ...]        # from "one", "first", "second": may stand in for a digit
    negations: tuple[str, ...]
    opposites: frozenset[tuple[int, int]]
    entities: tuple[str, ...]
    content: tuple[str, ...]             # lower-cased words that are not stopwords, in order
    han: str = ""                        # the CJK ideographs, in order (Chinese rules, verifier)

    @functools.cached_property
    def content_keys(self) -> frozenset[str]:
        """Matching keys of the content words (the verifier's IDF overlap)."""
        return frozenset(map(_key, self.content))

    @functools.cached_property
    def prefixes(self) -> frozenset[str]:
        """Alphabetic word keys cut short by 1-3 letters ("indian" -> "india", "indi")."""
        return frozenset(k[:-cut] for k in self.word_keys if k.isalpha()
                         for cut in (1, 2, 3) if len(k) - cut >= 3)

    @functools.cached_property
    def by_shape(self) -> dict[tuple[str, int], tuple[str, ...]]:
        """Alphabetic word keys of 6+ letters by first letter and length, for typo matching."""
        shapes: dict[tuple[str, int], list[str]] = {}
        for k in self.word_keys:
            if len(k) >= 6 and k.isalpha():
                shapes.setdefault((k[0], len(k)), []).append(k)
        return {shape: tuple(ks) for shape, ks in shapes.items()}


def _analyse(text: str) -> Analysis:
    tokens = _tokens(text)
    words = [w for w, _ in tokens]
    lows = [w.lower() for w in words]
    word_keys = frozenset(map(_key, lows))
    keys = set(word_keys)
    keys.update([_squash(k) for k in word_keys if not k.isalnum()])
    keys.update([j if j.isalnum() else _squash(j) for j in map("".join, itertools.pairwise(lows))])
    hard, soft = _numbers(text, lows)
    han = "".join(_HAN.findall(text))
    return Analysis(
        text=text,
        words=tuple(words),
        word_keys=word_keys,
        keys=frozenset(keys),
        aliases=frozenset(_ALIASES[k] for k in keys if k in _ALIASES),
        about_now=_about_now(tokens, lows),
        numbers=tuple(sorted(hard.elements())),
        soft_numbers=tuple(sorted(soft.elements())),
        negations=(*_negations(words, lows), *_zh_negations(han, text)),
        opposites=_opposites(lows),
        entities=tuple(_entities(tokens)),
        content=tuple(w for w in lows if w not in _STOPWORDS and w.isalpha() and not _HAN.search(w)),
        han=han,
    )


_cached_analyse = functools.lru_cache(maxsize=1024)(_analyse)
_CACHE_MAX_CHARS = 2000


def analyse(text: str) -> Analysis:
    """Read a prompt once for all guards (memoised for prompts up to 2,000 characters)."""
    if len(text) > _CACHE_MAX_CHARS:
        return _analyse(text)
    return _cached_analyse(text)


# --------------------------------------------------------------------------------------------
# The rules, on analyses

def _time_sensitive(query: Analysis, candidate: Analysis) -> bool:
    return query.about_now


def _numbers_differ(a: Analysis, b: Analysis) -> bool:
    if a.numbers == b.numbers:
        return False
    hard_a, hard_b = set(a.numbers), set(b.numbers)
    return bool(hard_a - hard_b - set(b.soft_numbers)) or bool(hard_b - hard_a - set(a.soft_numbers))


def _negation_differs(a: Analysis, b: Analysis) -> bool:
    return len(a.negations) % 2 != len(b.negations) % 2


def _antonyms_swapped(a: Analysis, b: Analysis) -> bool:
    only_b = b.opposites - a.opposites
    return any((pair, 1 - side) in only_b for pair, side in a.opposites - b.opposites)


def _near(a: str, b: str) -> bool:
    """One edit apart (Damerau: "hilary" / "hillary", "deanerys" / "daenerys")."""
    if abs(len(a) - len(b)) > 1 or a[0] != b[0]:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return (a[i + 1:] == b[i + 1:] or a[i + 1:] == b[i:] or a[i:] == b[i + 1:]
            or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1]))


def _mentions(other: Analysis, key: str) -> bool:
    """Whether ``other`` names ``key``: as a word or two joined, a demonym or plural ("India" /
    "Indian", "Jews" / "Jewish"), an alias (US / USA / America) or with a one-letter typo."""
    squashed = _squash(key)
    if key in other.keys or squashed in other.keys or _key(squashed) in other.keys:
        return True
    if _ALIASES.get(squashed) in other.aliases:
        return True
    if "-" in key:
        return all(_mentions(other, part) for part in key.split("-") if part)
    if not key.isalpha():
        return False
    if len(key) >= 3 and key in other.prefixes:
        return True                                         # "india" in "indian"
    if any(key[:-cut] in other.keys for cut in (1, 2, 3) if len(key) - cut >= 3):
        return True                                         # "jewish" has "jew"
    if len(key) >= 6:
        for size in (len(key) - 1, len(key), len(key) + 1):
            if any(_near(key, word) for word in other.by_shape.get((key[0], size), ()) if size >= 6):
                return True
    return False


def _unmatched(a: Analysis, b: Analysis) -> tuple[list[str], list[str]]:
    return ([e for e in a.entities if not _mentions(b, _key(e.lower()))],
            [e for e in b.entities if not _mentions(a, _key(e.lower()))])


def _entities_differ(a: Analysis, b: Analysis) -> bool:
    mine, theirs = _unmatched(a, b)
    return bool(mine) or bool(theirs)


_SYMMETRIC = frozenset({"and", "or", "nor", "vs", "versus", "&", "between", "with", "compared"})
_ARTICLES = frozenset({"a", "an", "the"})
_DIRECTED = frozenset({"to", "from", "than", "into", "onto", "over", "against", "by", "like", "likes", "for",
                       "towards", "toward", "beat", "beats", "hate", "hates", "love", "loves"})


def _order_swapped(a: Analysis, b: Analysis) -> bool:
    if a.han and b.han and _zh_swapped(a.han, b.han):
        return True
    if a.content == b.content or len(a.content) != len(b.content):
        return False
    diff = [i for i, (x, y) in enumerate(zip(a.content, b.content, strict=True)) if x != y]
    if len(diff) != 2:
        return False
    i, j = diff
    if a.content[i] != b.content[j] or a.content[j] != b.content[i]:
        return False
    # the words between the two swapped ones, in the query
    first, second = a.content[i], a.content[j]
    lowered = [w.lower() for w in a.words]
    start = lowered.index(first)
    end = lowered.index(second, start + 1) if second in lowered[start + 1:] else len(lowered)
    between = lowered[start + 1:end]
    if _SYMMETRIC.intersection(between):
        return False
    if j - i >= 2:
        return True
    return (bool(between) and all(w in _DIRECTED or w in _ARTICLES for w in between)
            and not _ARTICLES.issuperset(between))


# --------------------------------------------------------------------------------------------
# The guards: (query, candidate) -> True refuses the hit


def time_sensitive(query: str, candidate: str) -> bool:
    """The query asks about the present ("today", "now", "latest", "currently", "this week",
    "weather", "news", "price of", "stock" ...).

    An answer cached earlier may be stale, so such a query gets no *semantic* hit; the candidate
    is not read. (Exact hits are the caller's business: the entry's TTL covers them.)
    """
    return _time_sensitive(analyse(query), analyse(candidate))


def numbers_differ(query: str, candidate: str) -> bool:
    """The sets of numbers differ: digits (``1,000`` = ``1000``, ``3.0`` = ``3``, ``3rd`` = 3,
    ``5%`` = 5, ``1.2.3`` kept whole), number words two..twenty, tens, hundred..billion, ordinals
    third..twentieth. "one", "first" and "second" are soft: they may match a 1 / 2 on the other
    side but never make a difference on their own ("which one is best" = "which is best").
    """
    return _numbers_differ(analyse(query), analyse(candidate))


def negation_differs(query: str, candidate: str) -> bool:
    """One side is negated and the other is not: the parity of negation words differs
    ("is it safe" / "is it not safe", "why do" / "why don't"; "not", "no", "never", "n't",
    "without", "cannot", "none", "nobody", "nothing", "neither", "nor" ...)."""
    return _negation_differs(analyse(query), analyse(candidate))


def antonyms_swapped(query: str, candidate: str) -> bool:
    """One side uses a direction word and the other its opposite, each missing the word the other
    uses (given / received, buy / sell, before / after, more / less, best / worst ...)."""
    return _antonyms_swapped(analyse(query), analyse(candidate))


def unmatched_entities(query: str, candidate: str) -> tuple[list[str], list[str]]:
    """Names and identifiers of each side that the other side does not mention in any case."""
    return _unmatched(analyse(query), analyse(candidate))


def entities_differ(query: str, candidate: str) -> bool:
    """Names or identifiers differ: a capitalised word past a sentence's first word, an ALL-CAPS
    or mIxEd-case word, or a token with digits, ``_``, dots, ``@`` or ``://`` on one side that
    the other side does not mention (compared case-insensitively, "India's" = "india",
    "Node.js" = "nodejs", "US" = "USA"). Fires on a substitution ("President of Pakistan" /
    "President of India") and when one side names more ("restaurants in Bihar" / "restaurants in
    Munger, Bihar"): at equal recall that measured slightly safer than substitutions only.
    """
    return _entities_differ(analyse(query), analyse(candidate))


def order_swapped(query: str, candidate: str) -> bool:
    """Two content words trade places ("do guys like introvert girls" / "do girls like introvert
    guys", "drive from Texas to California" / "... from California to Texas"): the content words
    (no stopwords) are the same multiset, and one transposition turns one sequence into the
    other. Not when a symmetric connector sits between the two ("difference between X and Y"),
    and for neighbours only across a directed word ("Texas to California"), so that "selling on
    eBay work" / "selling work on eBay" passes."""
    return _order_swapped(analyse(query), analyse(candidate))


# --------------------------------------------------------------------------------------------
# Configuration and the check


class SecondStage(Protocol):
    """A check of the best candidate after the guards passed it (``proxy/verifier.py``)."""

    def score(self, query: str, candidate: str, cosine: float, embedder: str | None) -> float | None: ...

    def refuses(self, query: str, candidate: str, cosine: float, embedder: str | None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Guards:
    """Which guards run, one switch each; :func:`check` runs them in this order, then the
    verifier when one is attached (the composition root attaches it when ``cache.guards``
    names ``verifier``)."""

    time_sensitive: bool = True
    numbers: bool = True
    negation: bool = True
    antonyms: bool = True
    entities: bool = True
    order: bool = True
    verifier: SecondStage | None = field(default=None, compare=False)

    @classmethod
    def only(cls, *names: str) -> Guards:
        """Exactly the named guards on (unknown names raise ValueError; ``verifier`` is
        accepted and left to the caller, which owns the model)."""
        unknown = set(names) - set(GUARDS) - {"verifier"}
        if unknown:
            raise ValueError(f"unknown guards: {sorted(unknown)}")
        on = set(names)
        return cls(time_sensitive="time_sensitive" in on, numbers="numbers" in on, negation="negation" in on,
                   antonyms="antonyms" in on, entities="entities" in on, order="order" in on)

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in GUARDS if getattr(self, name))


#: name -> guard, in the order :func:`check` runs them (cheapest and commonest first)
GUARDS: dict[str, GuardFn] = {
    "time_sensitive": time_sensitive,
    "numbers": numbers_differ,
    "negation": negation_differs,
    "antonyms": antonyms_swapped,
    "entities": entities_differ,
    "order": order_swapped,
}

_ON_ANALYSES: dict[str, Callable[[Analysis, Analysis], bool]] = {
    "time_sensitive": _time_sensitive,
    "numbers": _numbers_differ,
    "negation": _negation_differs,
    "antonyms": _antonyms_swapped,
    "entities": _entities_differ,
    "order": _order_swapped,
}

ALL_GUARDS = Guards()
NO_GUARDS = Guards.only()
#: every guard: each measured to refuse wrong hits more often than a stricter threshold would
#: (bench/guard_eval.py on the QQP tuning pairs); time_sensitive is a staleness rule, on regardless
DEFAULT_GUARDS = ALL_GUARDS


def check(query: str, candidate: str, guards: Guards = DEFAULT_GUARDS, score: float | None = None,
          embedder: str | None = None) -> str | None:
    """The name of the first enabled guard that refuses serving ``candidate``'s answer to
    ``query``, or None when the hit may be served. Each prompt is read once for all guards.
    With the candidate's cosine ``score`` (from ``embedder``), an attached verifier runs last
    and refuses as ``"verifier"``."""
    enabled = guards.enabled
    if enabled:
        a, b = analyse(query), analyse(candidate)
        for name in enabled:
            if _ON_ANALYSES[name](a, b):
                return name
    if score is not None and guards.verifier is not None and guards.verifier.refuses(
            query, candidate, score, embedder):
        return "verifier"
    return None


def on_analyses(name: str, a: Analysis, b: Analysis) -> bool:
    """Whether guard ``name`` fires on two analyses (the verifier's features reuse them)."""
    return _ON_ANALYSES[name](a, b)


def fired(query: str, candidate: str, guards: Guards = ALL_GUARDS) -> tuple[str, ...]:
    """Every enabled guard that fires (for explain output and evaluation; ``check`` stops at the
    first)."""
    a, b = analyse(query), analyse(candidate)
    return tuple(name for name in guards.enabled if _ON_ANALYSES[name](a, b))
