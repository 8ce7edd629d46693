"""Phone numbers: the fast path must agree with `phonenumbers` on everything it answers."""

from __future__ import annotations

import random
from collections.abc import Iterator

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from incident_notify import phones
from incident_notify.errors import InvalidField

FORMATS = (PhoneNumberFormat.E164, PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.NATIONAL)
TYPES = (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE,
         PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST, PhoneNumberType.VOIP,
         PhoneNumberType.PERSONAL_NUMBER, PhoneNumberType.PAGER, PhoneNumberType.UAN,
         PhoneNumberType.VOICEMAIL)
REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)


def library(text: str, region: str) -> str | None:
    """What phonenumbers alone says (normalise_phone's slow path)."""
    prepared = _prepared(text)
    try:
        return phones._library_e164(text, prepared, region)
    except InvalidField:
        return None


def _prepared(text: str) -> str:
    text = text.strip()
    return "+" + text[2:] if text.startswith("00") else text


def _mutations(text: str, rng: random.Random) -> Iterator[str]:
    """Near misses of a valid number: a digit changed, one more, one fewer."""
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    for _ in range(3):
        chars = list(text)
        chars[rng.choice(digits)] = str(rng.randrange(10))
        yield "".join(chars)
    yield text + str(rng.randrange(10))
    yield text[:-1]


def example_cases(rng: random.Random) -> Iterator[tuple[str, str]]:
    """Every region's example number of every type, in every format, read in its own
    region and in another, with near misses."""
    for region in REGIONS:
        for kind in TYPES:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            for fmt in FORMATS:
                text = phonenumbers.format_number(example, fmt)
                yield text, region
                yield text, rng.choice(REGIONS)
                for near in _mutations(text, rng):
                    yield near, region
    for cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:  # non-geographic codes too
        example = phonenumbers.example_number_for_non_geo_entity(cc)
        if example is not None:
            yield phonenumbers.format_number(example, PhoneNumberFormat.E164), "US"


def random_cases(rng: random.Random, count: int) -> Iterator[tuple[str, str]]:
    codes = list(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    for _ in range(count):
        digits = "".join(str(rng.randrange(10)) for _ in range(rng.randrange(2, 15)))
        shape = rng.randrange(4)
        if shape == 0:
            yield f"+{rng.choice(codes)}{digits}", "US"
        elif shape == 1:
            yield f"+{rng.choice(codes)} {digits[:3]} {digits[3:]}", rng.choice(REGIONS)
        else:
            yield rng.choice(["", "0", "00", "(", "1"]) + digits, rng.choice(REGIONS)


def check(cases: Iterator[tuple[str, str]]) -> tuple[int, int, int]:
    """Compare the fast path with the library; return (cases, valid, answered fast)."""
    total = valid = fast_answers = 0
    for text, region in cases:
        total += 1
        expected = library(text, region)
        valid += expected is not None
        fast = phones._fast_e164(_prepared(text), region)
        if fast is not None:
            fast_answers += 1
            assert fast == expected, f"{text!r} in {region}: fast {fast!r}, library {expected!r}"
        if expected is not None:
            assert phones.normalise_phone(text, region) == expected
    return total, valid, fast_answers


def test_fast_path_agrees_with_the_library_on_every_regions_examples() -> None:
    total, valid, fast = check(example_cases(random.Random(20261124)))
    assert total > 10_000 and valid > 4_000
    # The fast path answers nearly every valid number (the rest go to the library).
    assert fast >= 0.97 * valid, (fast, valid)


def test_fast_path_agrees_with_the_library_on_random_numbers() -> None:
    total, valid, fast = check(random_cases(random.Random(7), 30_000))
    assert valid > 1_000 and fast >= 0.9 * valid, (total, valid, fast)


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("+1 202 555 0143", "US", "+12025550143"),
    ("(202) 555-0143", "US", "+12025550143"),
    ("+44 (0)20 7946 0958", "US", "+442079460958"),  # a trunk 0 after the code
    ("+39 06 6982 1234", "US", "+390669821234"),     # Italian leading zero kept
    ("020 7946 0958", "GB", "+442079460958"),        # national prefix stripped
    ("+1 340 555 0143", "US", "+13405550143"),       # +1 but US Virgin Islands
    ("+800 1234 5678", "US", "+80012345678"),        # non-geographic
])
def test_normalise_phone_known_answers(raw: str, region: str, e164: str) -> None:
    assert library(raw, region) == e164
    assert phones.normalise_phone(raw, region) == e164


@pytest.mark.parametrize(("raw", "region"), [
    ("+1 202 555 01", "US"), ("+999 1234 5678", "US"), ("12", "US"),
    ("+1 (202) 555-0143 x12", "US"), ("tel:+1-202-555-0143", "US"), ("+1 800 FLOWERS", "US"),
])
def test_other_forms_go_to_the_library(raw: str, region: str) -> None:
    """Invalid numbers, extensions, RFC 3966 and vanity numbers are not answered by the fast
    path, and normalise_phone gives the library's answer or its error."""
    assert phones._fast_e164(_prepared(raw), region) is None
    expected = library(raw, region)
    if expected is None:
        with pytest.raises(InvalidField) as info:
            phones.normalise_phone(raw, region)
        assert info.value.field_name == "phone" and repr(raw) in info.value.problem
    else:
        assert phones.normalise_phone(raw, region) == expected


def test_without_its_phonenumbers_internals_the_fast_path_switches_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    phones._calling_codes.cache_clear()
    monkeypatch.delattr("phonenumbers.phonenumberutil._test_number_length")
    try:
        assert phones._fast_e164("+12025550143", "US") is None
        monkeypatch.undo()  # parse() needs it too; the fast path stays off (cached)
        assert phones._fast_e164("+12025550143", "US") is None
        assert phones.normalise_phone("+1 202 555 0143") == "+12025550143"
    finally:
        phones._calling_codes.cache_clear()
    assert phones._fast_e164("+12025550143", "US") == "+12025550143"


def test_text_longer_than_parse_accepts_goes_to_the_library() -> None:
    """parse() refuses text over 250 characters, separators included."""
    padded = "+1" + " " * 239 + "2015550123"
    assert len(padded) == 251 and phones._fast_e164(padded, "US") is None
    with pytest.raises(InvalidField, match="too long"):
        phones.normalise_phone(padded, "US")
    assert phones.normalise_phone(padded[1:], "US") == "+12015550123"  # 250: still read


def test_region_must_be_spelled_as_the_library_spells_it() -> None:
    assert phones._fast_e164("020 7946 0958", "gb") is None
    assert library("020 7946 0958", "gb") is None
    assert phones.region_code(" gb ") == "GB"
    assert phones.normalise_phone("020 7946 0958", phones.region_code("gb")) == "+442079460958"
    from incident_notify.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        phones.region_code("XX")
    assert "'XX'" in info.value.message and "GB" in info.value.hint


def test_a_short_contact_list_never_builds_the_fast_path() -> None:
    """A playbook's team list (dozens of numbers) is read by the library alone: setting the
    fast path up costs more than that; a large list switches to it after the first 1,000."""
    import subprocess
    import sys

    code = (
        "from incident_notify import phones\n"
        "from incident_notify.contacts import load_contacts\n"
        "from pathlib import Path\n"
        "cs = load_contacts([Path('playbooks/contacts')])\n"
        "print(len(cs.contacts), phones._calling_codes.cache_info().currsize, "
        "len(phones._BY_CODE))\n"
        "for i in range(1500):\n"
        "    assert phones.normalise_phone(f'+1 202 555 {i % 10000:04d}') == "
        "f'+1202555{i % 10000:04d}'\n"
        "print(phones._calling_codes.cache_info().currsize, len(phones._BY_CODE))\n")
    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["37 0 0", "1 1"]
