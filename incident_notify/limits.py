"""Channel limits, exactly: Twitter's weighted length and threads, SMS segments, email lines.

* Tweets: Twitter's weighted length through the conformance-tested `twitter-text-parser`
  (URLs count 23, CJK and emoji 2, text NFC-normalised first); 280 at most. An over-long
  update is split at word boundaries into a numbered reply thread, each part within 280.
* SMS: GSM-7 when every character is in the GSM 03.38 basic or extension table (extension
  characters take 2 septets), else UCS-2 (UTF-16 code units). One segment holds 160 septets
  / 70 units; a multipart message 153 / 67 per segment (the rest is the UDH). Segments are
  counted by packing, so an escape pair or a surrogate pair is never split.

Long on purpose: each channel's length rule is a few functions and `measure` dispatches
over all of them; the tweet rule carries its exact fast paths and the loaders of the
library they defer to.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

TWEET_MAX = 280
DM_MAX = 10_000
EMAIL_LINE_MAX = 998

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


_DOMAIN_DOT = re.compile(r"[A-Za-z0-9]\.[A-Za-z0-9]")


def tweet_length(text: str) -> int:
    """Twitter's weighted length of `text` (NFC-normalised).

    Exact fast paths for printable ASCII, where every character weighs 1 and there is no
    emoji, so only a URL can change the weight: text with no domain-like dot (a letter or
    digit on both sides) and no '://' weighs its length, and so does text where no dot is
    followed by one of twitter-text's top-level domains; other ASCII text weighs its length
    with each URL that twitter-text's own extractor finds counted 23 (the library's
    extractor alone, a fifth of its import). Anything else goes to the whole library, which
    is also the tests' oracle for both fast paths."""
    if text.isascii() and text.replace("\n", " ").isprintable():
        if "://" not in text and not _DOMAIN_DOT.search(text):
            return len(text)
        return _ascii_weight_with_urls(text)
    return int(_parse_tweet()(unicodedata.normalize("NFC", text)).weightedLength)


def _ascii_weight_with_urls(text: str) -> int:
    """parse_tweet's count for printable ASCII: its loop, with its URL entities, where every
    other character weighs 1 (twitter-text's first range, 0-4351, weighs 100/100)."""
    if not _may_hold_url(text):
        return len(text)
    urls = {u["indices"][0]: u["url"] for u in _url_extractor()(text)}
    weight = i = 0
    n = len(text)
    while i < n:
        url = urls.get(i)
        if url is None:
            weight += 1
            i += 1
        else:
            weight += 23
            i += len(url)
    return weight


_AFTER_DOT = re.compile(r"\.([0-9A-Za-z-]+)")


def _may_hold_url(text: str) -> bool:
    """False only when twitter-text's extractor cannot find a URL in this ASCII text.

    Every URL it extracts holds a domain ending in a dot and then a top-level domain from
    its lists (followed by none of `0-9a-zA-Z@+-`, matched ignoring case) or `xn--`
    (punycode). Such a TLD, bounded so, is the whole run of `[0-9A-Za-z-]` after its dot,
    and the character after the run is not '@' or '+'. Text without one (a status page
    under `.example`, "v2.0.1", "e.g.", "app.internal") weighs its length without loading
    the extractor (a tenth of a second of regular expressions to compile)."""
    tlds = _tlds()
    if tlds is None:
        return True
    for found in _AFTER_DOT.finditer(text):
        run = found.group(1).lower()
        if run.startswith("xn--"):
            return True
        if run in tlds and text[found.end():found.end() + 1] not in ("@", "+"):
            return True
    return False


_TLD_PATTERN_ENDS = ("(?:(?:", ")(?=[^0-9a-zA-Z@+-]|$))")
_PUNYCODE_PATTERN = r"(?:xn--[\-0-9a-z]+)"
_REGEX_SYNTAX = frozenset("\\.^$*+?{}[]()|")


@lru_cache(maxsize=1)
def _tlds() -> frozenset[str] | None:
    """twitter-text's gTLD and ccTLD lists, lower case, read from the library's source
    (string literals joined, as its modules join them) without compiling its patterns.
    None, and every candidate goes to the extractor, when the source is not the plain
    alternation this reading expects (a later release may change it)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("twitter_text")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "regexp"
    names: set[str] = set()
    head, tail = _TLD_PATTERN_ENDS
    try:
        for module in ("valid_gtld", "valid_cctld"):
            source = (folder / f"{module}.py").read_text(encoding="utf-8")
            pattern = "".join(re.findall(r"'([^'\\]*)'", source))
            if not (pattern.startswith(head) and pattern.endswith(tail)):
                return None
            entries = pattern[len(head):-len(tail)].split("|")
            if any(not e or _REGEX_SYNTAX.intersection(e) for e in entries):
                return None
            names.update(e.lower() for e in entries)
        punycode = (folder / "valid_punycode.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return frozenset(names) if _PUNYCODE_PATTERN in punycode else None


_TWITTER_TEXT_URLS = "_incident_notify_twitter_text_urls"


@lru_cache(maxsize=1)
def _url_extractor() -> Callable[[str], list[dict[str, Any]]]:
    """twitter-text's `extract_urls_with_indices`, loaded without the package's __init__
    (which compiles the emoji tables and imports pkg_resources: 0.8-1.2 s): its modules are
    loaded under a private package name pointing at the same files."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("twitter_text")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("twitter_text", name="twitter_text")
    if _TWITTER_TEXT_URLS not in sys.modules:
        package = types.ModuleType(_TWITTER_TEXT_URLS)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[_TWITTER_TEXT_URLS] = package
    extract: Callable[[str], list[dict[str, Any]]] = importlib.import_module(
        f"{_TWITTER_TEXT_URLS}.extract_urls").extract_urls_with_indices
    return extract


@lru_cache(maxsize=1)
def _parse_tweet() -> Callable[[str], Any]:
    """twitter-text's `parse_tweet`. The library reads its emoji table through
    pkg_resources, which setuptools 81 no longer ships and which costs a scan of every
    installed distribution: a stand-in serving that one call is in place while it imports."""
    import sys
    import types

    if "twitter_text" in sys.modules or "pkg_resources" in sys.modules:
        from twitter_text import parse_tweet

        return parse_tweet
    shim = types.ModuleType("pkg_resources")

    def resource_string(module_name: str, resource: str) -> bytes:
        from pathlib import Path

        module_file = sys.modules[module_name].__file__
        assert module_file is not None
        return (Path(module_file).parent / resource).read_bytes()

    shim.resource_string = resource_string  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    try:
        from twitter_text import parse_tweet
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    return parse_tweet


@lru_cache(maxsize=8192)
def word_weight(word: str) -> int:
    """The weight of one space-free word; a text's weight is the sum of its words' weights
    plus one per separating space (checked against twitter-text in the tests)."""
    return tweet_length(word)


# ------------------------------------------------------------------ threads
_URL = re.compile(r"https?://\S+")


def _suffix(i: int, n: int) -> str:
    return f" {i}/{n}"


def _hard_split(word: str, room: int) -> list[str]:
    """Split one over-long word into pieces of at most `room` weight, by grapheme-ish
    units (a base character with its combining marks; surrogate pairs are one unit).
    Linear: units are weighed once each; a piece that the sum of its units' weights would
    misjudge (never seen; checked) falls back to measuring as it grows."""
    if word.isascii() and "." not in word and word.isprintable():
        return [word[i:i + room] for i in range(0, len(word), room)]
    units = _graphemes(word)
    pieces, current, weight = [], "", 0
    for unit in units:
        w = word_weight(unit)
        if current and weight + w > room:
            pieces.append(current)
            current, weight = unit, w
        else:
            current, weight = current + unit, weight + w
    if current:
        pieces.append(current)
    if all(tweet_length(p) <= room for p in pieces):
        return pieces
    return _hard_split_measured(units, room)


def _is_ri(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"


def _graphemes(word: str) -> list[str]:
    """Grapheme-ish units: a character with its combining marks, variation selectors,
    skin tones, keycap and tag characters; a ZWJ emoji sequence whole; flags as pairs."""
    units: list[str] = []
    for ch in word:
        prev = units[-1] if units else ""
        if prev and (unicodedata.combining(ch) or ch in "\u200d\ufe0f\u20e3"
                     or "\U0001f3fb" <= ch <= "\U0001f3ff"
                     or "\U000e0020" <= ch <= "\U000e007f"
                     or prev.endswith("\u200d")
                     or (_is_ri(ch) and len(prev) == 1 and _is_ri(prev))):
            units[-1] += ch
        else:
            units.append(ch)
    return units


def _hard_split_measured(units: list[str], room: int) -> list[str]:
    """Pieces of at most `room` weight, each cut where a binary search finds the longest
    prefix that still fits (a few measurements a piece, not one per unit: a long word full of
    URLs took seconds). A URL's weight does not grow with its length, so a shorter prefix
    can weigh more than a longer one; the search only ever keeps prefixes it measured as
    fitting, so every piece fits, and a single unit (at most 2) always does."""

    def fits(start: int, end: int) -> bool:
        return tweet_length("".join(units[start:end])) <= room

    pieces: list[str] = []
    start, n = 0, len(units)
    while start < n:
        hi = min(n, start + 4 * room)
        if fits(start, hi):
            end = hi
        else:
            lo = start + 1  # fits; hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(start, mid):
                    lo = mid
                else:
                    hi = mid
            end = lo
        pieces.append("".join(units[start:end]))
        start = end
    return pieces


def split_thread(text: str, max_weight: int = TWEET_MAX, numbering: bool = True) -> list[str]:
    """Split `text` into tweets of at most `max_weight`, numbered ' i/n' when more than one.

    Splits at word boundaries (never inside a URL unless a URL alone is too long, which
    cannot happen as URLs weigh 23); a single over-long word is split by characters.
    """
    text = unicodedata.normalize("NFC", text).strip()
    if tweet_length(text) <= max_weight:
        return [text]
    words = text.split()
    weights = [word_weight(w) for w in words]
    n = 2
    while True:
        # The suffix width depends on the number of parts: size for n, re-split if it grew.
        # Linear in the text: a part's weight is its words' weights plus the spaces.
        room = max_weight - (len(_suffix(n, n)) if numbering else 0)
        parts: list[str] = []
        current: list[str] = []
        weight = 0
        for word, w in zip(words, weights, strict=True):
            add = w + (1 if current else 0)
            if weight + add <= room:
                current.append(word)
                weight += add
                continue
            if current:
                parts.append(" ".join(current))
            if w <= room:
                current, weight = [word], w
            else:
                pieces = _hard_split(word, room)
                parts.extend(pieces[:-1])
                current, weight = [pieces[-1]], tweet_length(pieces[-1])
        if current:
            parts.append(" ".join(current))
        if len(parts) <= n or not numbering:
            break
        n = len(parts)
    if not numbering:
        return parts
    total = len(parts)
    return [f"{p}{_suffix(i, total)}" for i, p in enumerate(parts, start=1)]


# ------------------------------------------------------------------ SMS
@dataclass(frozen=True)
class SmsInfo:
    encoding: str
    """'GSM-7' or 'UCS-2'."""
    units: int
    """Septets (GSM-7) or UTF-16 code units (UCS-2)."""
    segments: int
    per_segment: int
    """Units per segment for this message (160/153 or 70/67)."""


def is_gsm7(text: str) -> bool:
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text)


def _units(text: str, gsm: bool) -> list[tuple[str, int]]:
    """(character, size in units) in order; sizes never split across segments."""
    if gsm:
        return [(ch, 2 if ch in GSM7_EXTENSION else 1) for ch in text]
    return [(ch, 2 if ord(ch) > 0xFFFF else 1) for ch in text]


def split_sms(text: str) -> list[str]:
    """The contents of each segment, packed as a phone network does."""
    gsm = is_gsm7(text)
    units = _units(text, gsm)
    total = sum(size for _, size in units)
    single, multi = (160, 153) if gsm else (70, 67)
    if total <= single:
        return [text] if text else [""]
    segments, current, used = [], "", 0
    for ch, size in units:
        if used + size > multi:
            segments.append(current)
            current, used = "", 0
        current += ch
        used += size
    if current:
        segments.append(current)
    return segments


def sms_segments(text: str) -> SmsInfo:
    gsm = is_gsm7(text)
    total = sum(size for _, size in _units(text, gsm))
    single, multi = (160, 153) if gsm else (70, 67)
    segments = len(split_sms(text)) if text else 1
    return SmsInfo("GSM-7" if gsm else "UCS-2", total, segments,
                   single if segments == 1 else multi)


# ------------------------------------------------------------------ email
def check_email(subject: str | None, body: str) -> list[str]:
    problems = []
    if subject is not None and ("\n" in subject or "\r" in subject):
        problems.append("the subject must be one line")
    for number, line in enumerate(body.splitlines(), start=1):
        size = len(line.encode("utf-8"))
        if size > EMAIL_LINE_MAX:
            problems.append(f"body line {number} is {size} bytes (at most {EMAIL_LINE_MAX})")
    return problems


# ------------------------------------------------------------------ one entry point
@dataclass(frozen=True)
class Measure:
    rule: str
    value: int
    limit: int | None
    unit: str
    detail: str = ""
    ok: bool = True


def measure(length_rule: str, text: str, *, max_length: int | None = None,
            max_segments: int = 3, subject: str | None = None) -> Measure:
    """Measure `text` by a channel's length rule against its limit."""
    if length_rule == "twitter-weighted":
        limit = max_length or TWEET_MAX
        value = tweet_length(text)
        return Measure(length_rule, value, limit, "weighted chars", ok=value <= limit)
    if length_rule == "sms-segments":
        info = sms_segments(text)
        return Measure(length_rule, info.segments, max_segments, "segments",
                       f"{info.encoding}, {info.units} units", ok=info.segments <= max_segments)
    if length_rule == "chars":
        limit = max_length or DM_MAX
        value = len(text)
        return Measure(length_rule, value, limit, "chars", ok=value <= limit)
    if length_rule == "email":
        problems = check_email(subject, text)
        longest = max((len(line.encode()) for line in text.splitlines()), default=0)
        return Measure(length_rule, longest, EMAIL_LINE_MAX, "bytes longest line",
                       "; ".join(problems), ok=not problems)
    raise ValueError(f"unknown length rule {length_rule!r}")
