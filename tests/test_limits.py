"""Channel limits, exactly: weighted tweet length, threads, SMS segments."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from incident_notify.limits import (
    check_email,
    measure,
    sms_segments,
    split_sms,
    split_thread,
    tweet_length,
)


def test_exactly_280_passes_and_281_fails() -> None:
    assert tweet_length("a" * 280) == 280
    assert measure("twitter-weighted", "a" * 280).ok
    assert not measure("twitter-weighted", "a" * 281).ok


@pytest.mark.parametrize("url", ["https://x.co", "https://status.example.com/" + "p" * 200])
def test_url_counts_23_whatever_its_length(url: str) -> None:
    assert tweet_length(f"see {url}") == 4 + 23


def test_text_with_an_unknown_tld_is_not_a_url() -> None:
    # twitter-text links only real TLDs; .example counts character by character.
    assert tweet_length("https://status.acme.example/" + "p" * 10) == 38


def test_emoji_and_cjk_count_two() -> None:
    assert tweet_length("😀") == 2
    assert tweet_length("日本") == 4
    assert tweet_length("日" * 140) == 280
    assert not measure("twitter-weighted", "日" * 141).ok


def test_nfc_normalisation() -> None:
    decomposed = unicodedata.normalize("NFD", "é")
    assert len(decomposed) == 2
    assert tweet_length(decomposed) == 1


def test_text_that_fits_is_one_unnumbered_part() -> None:
    assert split_thread("short update") == ["short update"]


def test_thread_parts_fit_keep_order_and_are_numbered() -> None:
    words = [f"w{i}" for i in range(300)]
    text = " ".join(words)
    parts = split_thread(text)
    n = len(parts)
    assert n > 1
    for i, part in enumerate(parts, start=1):
        assert tweet_length(part) <= 280
        assert part.endswith(f" {i}/{n}")
    rejoined = " ".join(p.rsplit(" ", 1)[0] for p in parts).split()
    assert rejoined == words


def test_thread_numbering_width_past_nine_parts() -> None:
    text = " ".join(["abcdefghij"] * 400)  # ~4,400 chars: more than 9 parts
    parts = split_thread(text)
    assert len(parts) >= 10
    assert all(tweet_length(p) <= 280 for p in parts)
    assert parts[-1].endswith(f" {len(parts)}/{len(parts)}")


def test_thread_with_urls_and_emoji_stays_within_limit() -> None:
    text = " ".join(["update 😀 https://status.acme.example/incident/4321"] * 40)
    parts = split_thread(text)
    assert all(tweet_length(p) <= 280 for p in parts)
    assert all("https://status.acme.example/incident/4321" in p for p in parts[:-1])


def test_single_overlong_word_is_hard_split_without_breaking_emoji() -> None:
    text = "😀" * 200  # 400 weighted, one "word"
    parts = split_thread(text)
    assert all(tweet_length(p) <= 280 for p in parts)
    assert "".join(p.rsplit(" ", 1)[0] for p in parts) == text


@pytest.mark.parametrize(("text", "segments", "encoding"), [
    ("a" * 160, 1, "GSM-7"),
    ("a" * 161, 2, "GSM-7"),
    ("a" * 306, 2, "GSM-7"),
    ("a" * 307, 3, "GSM-7"),
    ("€" * 80, 1, "GSM-7"),      # extension characters count 2 septets: 160
    ("€" * 81, 2, "GSM-7"),
    ("a" * 159 + "😀", 3, "UCS-2"),  # one emoji forces UCS-2 (161 units -> 3 x 67)
    ("ж" * 70, 1, "UCS-2"),
    ("ж" * 71, 2, "UCS-2"),
])
def test_sms_segments(text: str, segments: int, encoding: str) -> None:
    info = sms_segments(text)
    assert (info.segments, info.encoding) == (segments, encoding)


def test_extension_char_never_split_across_segments() -> None:
    # 152 plain septets then '€' (2 septets): it cannot straddle the 153 boundary.
    text = "a" * 152 + "€" + "b" * 20
    segments = split_sms(text)
    assert segments[0] == "a" * 152
    assert segments[1].startswith("€")
    assert sms_segments(text).segments == 2


def test_surrogate_pair_never_split_across_segments() -> None:
    text = "ж" * 66 + "😀" + "ж" * 10  # the emoji would straddle units 67/68
    segments = split_sms(text)
    assert segments[0] == "ж" * 66
    assert segments[1].startswith("😀")
    assert "".join(segments) == text


def test_sms_budget_in_measure() -> None:
    assert measure("sms-segments", "a" * 459, max_segments=3).ok
    m = measure("sms-segments", "a" * 460, max_segments=3)
    assert not m.ok and m.value == 4 and "GSM-7" in m.detail


def test_dm_and_email_limits() -> None:
    assert measure("chars", "x" * 10_000).ok
    assert not measure("chars", "x" * 10_001).ok
    assert check_email("one line", "short\nlines") == []
    assert check_email("two\nlines", "ok")
    assert check_email("ok", "é" * 500)  # 1,000 bytes in one line


def test_the_library_loads_without_pkg_resources_in_a_fresh_interpreter() -> None:
    # twitter-text-parser imports pkg_resources, which setuptools 81 no longer ships: with
    # it made unimportable, both the URL extractor and the whole library still load.
    code = (
        "import sys\n"
        "class Gone:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pkg_resources': raise ModuleNotFoundError(name=name)\n"
        "sys.meta_path.insert(0, Gone())\n"
        "from incident_notify.limits import tweet_length\n"
        "a = tweet_length('see https://example.com/x now')\n"
        "assert 'twitter_text' not in sys.modules, 'the URL path imported the whole library'\n"
        "b = tweet_length('\u65e5\u672c \U0001F600 https://example.com')\n"
        "print(a, b, 'pkg_resources' in sys.modules)\n")
    assert _fresh_python(code).split() == ["31", "31", "False"]


def _fresh_python(code: str) -> str:
    """What `code` prints in a fresh interpreter (nothing imported yet)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------ the fast path's oracle
_VOCAB = ["hello", "world", "LON-2", "example.com", "https://status.acme.example/i/1",
          "acme.co.uk,", "日本語", "한국어", "👩\u200d👩\u200d👧\u200d👦", "👍🏽", "🇬🇧", "e\u0301",
          "café", "x.y", "v2.0.1", "\u2014", "©", "®", "#1", "@user", "$CASH", "foo.",
          "www.acme.com/path?x=1", "Ωmega", "1.5", "status.acme.example.", "1\ufe0f\u20e3",
          "a:b", "~!", "(compute)", "50%", "\u00a0", "tab\tx"]


def test_fast_path_and_word_additivity_agree_with_twitter_text() -> None:
    import random

    from twitter_text import parse_tweet

    rng = random.Random(20261126)
    alphabet = [chr(c) for c in range(32, 127)]
    for _ in range(3000):  # printable ASCII: the fast path
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert tweet_length(text) == parse_tweet(text).weightedLength, text
    # Sentences, dots and newlines near words, look-alikes of domains and schemes: the fast
    # path takes what has no domain-like dot, the library the rest; both must agree.
    pieces = ["Power", "is", "back", "LON-2", "v1", "2", "ops", "acme", "example", "co", "uk",
              "http", "https", "www", "a", "Z9", "x_"]
    glue = [". ", ".", " ", "\n", "...", ": ", "://", "/", "@", "-", ", ", ".\n", "(", ")"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) + rng.choice(glue)
                       for _ in range(rng.randint(1, 12)))
        assert tweet_length(text) == parse_tweet(text).weightedLength, repr(text)
    for _ in range(1500):  # mixed words: weight = words' weights + spaces
        words = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 12))]
        words = [w for w in words if w.split() == [w]] or ["x"]
        joined = " ".join(words)
        from incident_notify.limits import word_weight

        expected = parse_tweet(unicodedata.normalize("NFC", joined)).weightedLength
        assert sum(word_weight(w) for w in words) + len(words) - 1 == expected, joined


_URL_PARTS = {
    "scheme": ["", "", "http://", "https://", "HTTPS://", "ftp://", "https:/", "://"],
    "host": ["acme", "status.acme", "www.acme", "t", "a-b", "x_y", "-bad", "sub.sub.acme",
             "ACME", "a" * 64, "1.2.3", "localhost", "status.acme.example", "t.co"],
    "tld": [".com", ".org", ".io", ".co.uk", ".dev", ".example", ".invalid", ".jp", ".c",
            ".app", ".COM", ".museum", "", ".xn--p1ai", ".co"],
    "port": ["", "", "", ":8080", ":", ":99999"],
    "path": ["", "", "/", "/i/4321", "/a/b/", "/p?x=1", "/p?x=1&y=2.", "/(x)", "/a.b",
             "/~u", "/%20", "/a#frag", "?q=1", "/" + "p" * 40],
    "before": ["", " ", " ", "\n", "(", "@", "$", "#", "x", ".", "/", "\"", "-"],
    "after": ["", " ", " ", ".", ",", ")", "!", "?", ":", "\n", "...", "'", "/"],
}


def _random_url_text(rng: Any, extra: list[str]) -> str:
    """Text made of words and URL look-alikes: with and without a scheme, bare domains,
    real and unknown TLDs, ports, paths, queries, and punctuation on either side."""
    out = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.35:
            out.append(rng.choice(extra))
            continue
        p = _URL_PARTS
        out.append(rng.choice(p["before"]) + rng.choice(p["scheme"]) + rng.choice(p["host"])
                   + rng.choice(p["tld"]) + rng.choice(p["port"]) + rng.choice(p["path"])
                   + rng.choice(p["after"]))
    return rng.choice(["", " "]).join(out) if rng.random() < 0.2 else " ".join(out)


def test_urls_in_ascii_text_weigh_as_twitter_text_says() -> None:
    import random

    from twitter_text import parse_tweet

    from incident_notify.limits import _ascii_weight_with_urls

    rng = random.Random(2611)
    words = ["Power", "is", "back", "see", "LON-2", "v1.2", "e.g.", "ops", "a.b", "x", "50%"]
    for _ in range(2500):  # printable ASCII with URL candidates: the extractor path
        text = _random_url_text(rng, words)
        expected = parse_tweet(text).weightedLength
        assert tweet_length(text) == expected, repr(text)
        if text.replace("\n", " ").isprintable():
            assert _ascii_weight_with_urls(text) == expected, repr(text)


def test_mixed_scripts_emoji_and_urls_weigh_as_twitter_text_says() -> None:
    import random

    from twitter_text import parse_tweet

    rng = random.Random(1126)
    for _ in range(1500):  # CJK, ZWJ sequences, combining marks, next to URLs and domains
        text = _random_url_text(rng, _VOCAB)
        if rng.random() < 0.5:
            text = unicodedata.normalize("NFD", text)
        assert tweet_length(text) == parse_tweet(
            unicodedata.normalize("NFC", text)).weightedLength, repr(text)


def test_a_text_whose_dots_end_in_no_known_tld_weighs_without_the_extractor() -> None:
    # The shipped playbooks link status pages under .example; versions and abbreviations
    # hold dots too. None can be a URL, so the extractor's patterns are never compiled.
    code = (
        "import sys\n"
        "from incident_notify.limits import tweet_length\n"
        "texts = ['see https://status.acme.example/i/1 now', 'v2.0.1 e.g. app.internal',\n"
        "         'mail ops@acme.com+x', 'a.COM-b a.io1 node3.dc2']\n"
        "print([tweet_length(t) for t in texts])\n"
        "print('_incident_notify_twitter_text_urls' in sys.modules)\n"
        "print(tweet_length('see https://status.acme.COM/i/1'))\n"
        "print('_incident_notify_twitter_text_urls' in sys.modules)\n")
    assert _fresh_python(code).split("\n")[:4] == ["[39, 24, 19, 23]", "False", "27", "True"]


def test_no_url_is_found_where_no_dot_is_followed_by_a_tld() -> None:
    """The pre-check against the extractor itself, on text made around twitter-text's own
    TLDs: any case, followed by what bounds a TLD and by what does not, punycode."""
    import random

    from twitter_text import parse_tweet

    from incident_notify.limits import _may_hold_url, _tlds, _url_extractor

    tlds = sorted(_tlds() or ())
    assert len(tlds) > 1000
    ascii_tlds = [t for t in tlds if t.isascii()]
    rng = random.Random(26112026)
    after = ["", " ", "/", ".", "@", "+", "-", "1", "a", ":80", "?x", ")", ",", "_", "#"]
    before = ["", " ", "@", "://", "https://", "www.", "a-", "-", "x_", "(", "1"]
    hosts = ["acme", "a", "status.acme", "ACME", "xn--p1ai", "1", "a-b", "x_y", ""]
    fakes = ["example", "internal", "local", "comm", "co-op", "xn--", "XN--P1AI", "c0m",
             "invalid", "test", "lan"]
    extract = _url_extractor()
    said_no = 0
    for _ in range(12000):
        tld = rng.choice(ascii_tlds + fakes)
        tld = {0: tld, 1: tld.upper(), 2: tld.title()}[rng.randrange(3)]
        text = " ".join(
            rng.choice(before) + rng.choice(hosts) + "." + (
                tld if rng.random() < 0.7 else rng.choice(fakes)) + rng.choice(after)
            for _ in range(rng.randint(1, 3)))
        if not _may_hold_url(text):
            said_no += 1
            assert extract(text) == [], repr(text)
        assert tweet_length(text) == parse_tweet(text).weightedLength, repr(text)
    assert 2000 < said_no < 10000  # both answers were tried


def test_the_tld_lists_are_read_as_the_library_compiles_them(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    import importlib.util

    from twitter_text.regexp.valid_cctld import valid_cctld
    from twitter_text.regexp.valid_gtld import valid_gtld

    from incident_notify import limits

    compiled = set()
    for pattern in (valid_gtld.pattern, valid_cctld.pattern):
        body = pattern[len("(?:(?:"):-len(")(?=[^0-9a-zA-Z@+-]|$))")]
        compiled |= {t.lower() for t in body.split("|")}
    assert limits._tlds() == compiled
    # A later release written otherwise: every dotted text goes to the extractor.
    regexp = tmp_path / "twitter_text" / "regexp"
    regexp.mkdir(parents=True)
    (regexp / "valid_gtld.py").write_text(
        "import re\nvalid_gtld = re.compile(r'(?:(?:com|[a-z]{2,})(?=[^0-9a-zA-Z@+-]|$))')\n")
    (regexp / "valid_cctld.py").write_text("valid_cctld = None\n")
    spec = importlib.util.spec_from_file_location(
        "twitter_text", regexp.parent / "__init__.py",
        submodule_search_locations=[str(regexp.parent)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec
                        if name == "twitter_text" else real_find_spec(name, *a))
    limits._tlds.cache_clear()
    try:
        assert limits._tlds() is None
        assert limits._may_hold_url("see status.acme.example")
    finally:
        limits._tlds.cache_clear()


@pytest.mark.parametrize("seed", range(6))
def test_split_thread_parts_fit_and_keep_every_word(seed: int) -> None:
    import random

    rng = random.Random(seed)
    words = [rng.choice(_VOCAB[:-2]) for _ in range(rng.randint(60, 400))]
    if seed % 2:
        words.append("".join(rng.choice(_VOCAB[:8]) for _ in range(150)))  # one huge word
    text = " ".join(words)
    parts = split_thread(text)
    assert len(parts) > 1
    assert all(tweet_length(p) <= 280 for p in parts)
    bodies = [p.rsplit(" ", 1)[0] for p in parts]
    assert "".join(bodies).replace(" ", "") == \
        unicodedata.normalize("NFC", text).replace(" ", "")
