"""Channel limits, exactly: Twitter's weighted length and threads, SMS segments, email lines.

* Tweets: Twitter's weighted length through the conformance-tested `twitter-text-parser`
  (URLs count 23, CJK and emoji 2, text NFC-normalised first); 280 at most. An over-long
  update is split at word boundaries into a numbered reply thread, each part within 280.
* SMS: GSM-7 when every character is in the GSM 03.38 basic or extension table (extension
  characters take 2 septets), else UCS-2 (UTF-16 code units). One segment holds 160 septets
  / 70 units; a multipart message 153 / 67 per segment (the rest is the UDH). Segments are
  counted by packing, so an escape pair or a surrogate pair is never split.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

TWEET_MAX = 280
DM_MAX = 10_000
EMAIL_LINE_MAX = 998

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


def tweet_length(text: str) -> int:
    """Twitter's weighted length of `text` (NFC-normalised)."""
    from twitter_text import parse_tweet

    return int(parse_tweet(unicodedata.normalize("NFC", text)).weightedLength)


# ------------------------------------------------------------------ threads
_URL = re.compile(r"https?://\S+")


def _suffix(i: int, n: int) -> str:
    return f" {i}/{n}"


def _hard_split(word: str, room: int) -> list[str]:
    """Split one over-long word into pieces of at most `room` weight, by grapheme-ish
    units (a base character with its combining marks; surrogate pairs are one unit)."""
    units: list[str] = []
    for ch in word:
        if units and (unicodedata.combining(ch) or ch in "\u200d\ufe0f"):
            units[-1] += ch
        else:
            units.append(ch)
    pieces, current = [], ""
    for unit in units:
        if current and tweet_length(current + unit) > room:
            pieces.append(current)
            current = unit
        else:
            current += unit
    if current:
        pieces.append(current)
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
    n = 2
    while True:
        # The suffix width depends on the number of parts: size for n, re-split if it grew.
        room = max_weight - (len(_suffix(n, n)) if numbering else 0)
        parts: list[str] = []
        current = ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if tweet_length(candidate) <= room:
                current = candidate
                continue
            if current:
                parts.append(current)
            if tweet_length(word) <= room:
                current = word
            else:
                pieces = _hard_split(word, room)
                parts.extend(pieces[:-1])
                current = pieces[-1]
        if current:
            parts.append(current)
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
