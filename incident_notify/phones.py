"""Phone numbers to E.164, validated with `phonenumbers`, fast enough for 100,000 contacts.

`phonenumbers.parse` followed by `is_valid_number` costs about 20 µs a number: generic text
handling (RFC 3966, extensions, vanity letters, second numbers) and each of a region's type
patterns matched through several layers of helpers. A contacts file of 100,000 rows cannot
afford that, so :func:`normalise_phone` first tries an exact fast path:

* It takes only the common shapes: ASCII digits with an optional leading ``+``, spaces, dots,
  hyphens and parentheses, at least 3 digits and at most 250 characters (parse's limit).
  None of phonenumbers' extension, vanity or RFC 3966 rules can apply to such text, so its
  digits are exactly what ``parse`` would work on.
* It then follows ``parse``'s own steps with phonenumbers' own metadata: the country code
  after ``+``; for a national number, a default region spelled exactly as phonenumbers
  lists it, no IDD and no leading country code; the national prefix stripped and kept under
  parse's length rule (followed here where the region has no transform rule, by
  phonenumbers' own helper where it has one).
* Validity is ``is_valid_number``'s rule (region chosen by leading digits or by type, then
  "the number has a known type"), with each region's patterns compiled once into one
  pattern per number length.

Whatever the fast path is not sure of (any other character, an IDD, a national number that
starts with its own country code, an unknown country code, a number it finds invalid) goes
through the full library, so errors and rare forms are exactly the library's. If a later
phonenumbers drops the internals used here, the fast path switches itself off.
tests/test_phones.py checks that both paths agree on every region's example numbers, in
every format, and on many random numbers; a reviewer's run compared 70 million inputs.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import cache, lru_cache
from typing import Any

from incident_notify.errors import ConfigError, InvalidField

# Digits with an optional leading '+', and the separators people type.
_SHAPE = re.compile(r"\+?[0-9 ().\-]+")
_SEPARATORS = str.maketrans("", "", " ().-")
_TYPE_DESCS = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager",
               "uan", "voicemail", "fixed_line")
_MIN_NSN, _MAX_NSN = 2, 17  # phonenumbers' _MIN_LENGTH_FOR_NSN and _MAX_LENGTH_FOR_NSN
_MAX_INPUT = 250  # phonenumbers' _MAX_INPUT_STRING_LENGTH: parse() refuses longer text


def region_code(region: str) -> str:
    """A default region as phonenumbers wants it ("gb" -> "GB"), or ConfigError."""
    import phonenumbers

    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(f"default region {region!r} is not a region code that phone "
                          "numbers can be read in",
                          "a two-letter ISO 3166 code such as US, GB or DE (--region, "
                          "INCIDENT_NOTIFY_REGION, or default_region in the config)")
    return code


def normalise_phone(raw: str, region: str = "US") -> str:
    """The E.164 form of a phone number, or InvalidField naming the problem.

    National numbers are read as `region` (a code from phonenumbers.SUPPORTED_REGIONS:
    see region_code); a leading ``00`` is read as ``+``.
    """
    global _read
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    _read += 1
    fast = _fast_e164(text, region) if _read > _LIBRARY_FIRST else None
    return fast if fast is not None else _library_e164(raw, text, region)


# The first numbers a process reads go to the library: building the fast path (~0.1 s for
# +1, shared by 25 regions) pays off only after a few thousand; a team list has dozens.
_LIBRARY_FIRST, _read = 1000, 0


def _library_e164(raw: str, text: str, region: str) -> str:
    import phonenumbers

    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidField("phone", f"{raw!r} is not a phone number ({exc})",
                           "use international format, e.g. +44 20 7946 0958") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidField("phone", f"{raw!r} is not a valid number",
                           f"check the digits; national numbers are read as region {region}")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


# ------------------------------------------------------------------ the fast path
def _fast_e164(text: str, region: str) -> str | None:
    """E.164 when this path is certain the library would say the same; else None."""
    codes = _calling_codes()
    if codes is None or len(text) > _MAX_INPUT:
        return None
    plain = codes.plain_e164.fullmatch(text)  # the commonest shape: '+', code, digits
    if plain is None:
        if not _SHAPE.fullmatch(text):
            return None
        compact = text.translate(_SEPARATORS)
        if compact[:1] == "+":
            plain = codes.plain_e164.fullmatch(compact)
            if plain is None:
                return None  # no known calling code
    if plain is not None:
        code, nsn = plain.groups()
        parsing = _BY_CODE.get(code) or _parsing_for_code(code)
    else:
        if len(compact) < 3:
            return None  # parse() finds "1-2" not viable (two digits only stand alone)
        parsing = _BY_REGION.get(region) or _parsing_for_region(region)
        if parsing is None or parsing.national_blocked(compact):
            return None
        nsn = compact
    if parsing is None or len(nsn) < _MIN_NSN:
        return None
    if parsing.national_prefix is not None:
        nsn = parsing.strip_national_prefix(nsn)
    if not _MIN_NSN <= len(nsn) <= _MAX_NSN:
        return None
    # Most numbers belong to the code's first region, checked with one regex call.
    quick = parsing.quick.get(len(nsn))
    if (quick is not None and quick.fullmatch(nsn)) or parsing.rules.valid(nsn):
        return f"+{parsing.cc}{nsn}"
    return None


class _Parsing:
    """What parse() reads from one region's metadata, compiled once."""

    def __init__(self, cc: int, metadata: Any, lib: Any) -> None:
        self.cc = cc
        self.metadata = metadata
        self.lib = lib
        self.cc_text = str(cc)
        idd, npfp = metadata.international_prefix, metadata.national_prefix_for_parsing
        self.idd = re.compile(idd) if idd else None
        self.national_prefix = re.compile(npfp) if npfp else None
        general = metadata.general_desc
        # Without a transform rule, stripping is simple enough to follow here (below);
        # with one (AR, BR, JP, NANPA islands...), phonenumbers' own helper does it.
        self.simple_prefix = bool(not metadata.national_prefix_transform_rule
                                  and general is not None and general.possible_length)
        if self.simple_prefix:
            pattern = general.national_number_pattern
            self.general = re.compile(pattern) if pattern else None
            self.lengths = list(general.possible_length)
            self.local_lengths = set(general.possible_length_local_only or ())
        result = lib.ValidationResult
        self.not_possible = (result.TOO_SHORT, result.IS_POSSIBLE_LOCAL_ONLY,
                             result.INVALID_LENGTH)
        self.rules = _rules(cc)
        # The first region's patterns, when a match there alone makes the number valid.
        first = self.rules.regions[0] if self.rules.regions else None
        self.quick = (first.by_length if first is not None
                      and (self.rules.single or first.leading is None) else {})

    def national_blocked(self, digits: str) -> bool:
        """A national number parse() would read as international: an IDD, or a number
        starting with the region's own country code (both left to the library)."""
        return bool(self.idd and self.idd.match(digits)) or digits.startswith(self.cc_text)

    def strip_national_prefix(self, nsn: str) -> str:
        """parse(): strip a national prefix, unless what is left has a length that
        _test_number_length calls TOO_SHORT, IS_POSSIBLE_LOCAL_ONLY or INVALID_LENGTH."""
        assert self.national_prefix is not None
        match = self.national_prefix.match(nsn)
        if match is None:
            return nsn
        if not self.simple_prefix:
            _, stripped, _ = self.lib._maybe_strip_national_prefix_carrier_code(
                nsn, self.metadata)
            if self.lib._test_number_length(stripped, self.metadata) in self.not_possible:
                return nsn
            return str(stripped)
        # _maybe_strip_national_prefix_carrier_code without a transform rule: drop the
        # match (a carrier code in it is dropped too), unless the number fit the general
        # pattern before and does not after.
        stripped = nsn[match.end():]
        general = self.general
        if general is not None and general.fullmatch(nsn) and not general.fullmatch(stripped):
            return nsn
        return stripped if self._possible_after_stripping(len(stripped)) else nsn

    def _possible_after_stripping(self, length: int) -> bool:
        """_test_number_length(number, metadata) (the general desc's lengths) is not
        TOO_SHORT, IS_POSSIBLE_LOCAL_ONLY or INVALID_LENGTH."""
        if length in self.local_lengths:
            return False  # IS_POSSIBLE_LOCAL_ONLY
        lengths = self.lengths
        if lengths[0] == length:
            return True  # IS_POSSIBLE
        if lengths[0] > length:
            return False  # TOO_SHORT
        if lengths[-1] < length:
            return True  # TOO_LONG
        return length in lengths[1:]  # IS_POSSIBLE, or INVALID_LENGTH


class _CallingCodes:
    """The calling codes phonenumbers knows, by their digits, and a pattern that splits
    '+<code><digits>' in one call (codes are prefix-free, so the split is unique)."""

    def __init__(self, table: dict[int, Any]) -> None:
        self.regions = {str(cc): cc for cc in table}
        self.plain_e164 = re.compile(rf"\+({_trie(self.regions)})([0-9]+)")


def _trie(words: Collection[str]) -> str:
    """A pattern matching exactly `words` (prefix-free), branching digit by digit, so that
    a match costs a few steps rather than a try of every word."""
    branches = []
    for first in sorted({w[0] for w in words}):
        rest = [w[1:] for w in words if w[0] == first]
        branches.append(first if rest == [""] else f"{first}(?:{_trie(rest)})")
    return "|".join(branches)


@lru_cache(maxsize=1)
def _calling_codes() -> _CallingCodes | None:
    """None (the fast path off) if the phonenumbers internals it uses have moved."""
    try:
        from phonenumbers import phonenumberutil as lib

        for name in ("_maybe_strip_national_prefix_carrier_code", "_test_number_length",
                     "ValidationResult", "COUNTRY_CODE_TO_REGION_CODE"):
            getattr(lib, name)
    except (ImportError, AttributeError):
        return None
    return _CallingCodes(lib.COUNTRY_CODE_TO_REGION_CODE)


# Compiled once per calling code and per default region, on first use (plain dicts: this
# is looked up once per phone number).
_BY_CODE: dict[str, _Parsing | None] = {}
_BY_REGION: dict[str, _Parsing | None] = {}


def _parsing_for_code(code: str) -> _Parsing | None:
    from phonenumbers import PhoneMetadata, phonenumberutil, region_code_for_country_code

    cc = int(code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(
        cc, region_code_for_country_code(cc))
    parsing = None if metadata is None else _Parsing(cc, metadata, phonenumberutil)
    _BY_CODE[code] = parsing
    return parsing


def _parsing_for_region(region: str) -> _Parsing | None:
    parsing = None
    if _calling_codes() is not None:
        from phonenumbers import SUPPORTED_REGIONS, PhoneMetadata, phonenumberutil

        # parse() reads a national number only in a region spelled exactly as listed.
        metadata = (PhoneMetadata.metadata_for_region(region, None)
                    if region in SUPPORTED_REGIONS else None)
        if metadata is not None and metadata.country_code:
            parsing = _Parsing(metadata.country_code, metadata, phonenumberutil)
    _BY_REGION[region] = parsing
    return parsing


class _Desc:
    """One PhoneNumberDesc as phonenumbers' _is_number_matching_desc reads it: the number's
    length among the possible lengths (if any are listed), then its pattern matching whole."""

    __slots__ = ("lengths", "source")

    def __init__(self, desc: Any) -> None:
        self.lengths = frozenset(desc.possible_length or ())
        self.source: str = desc.national_number_pattern

    def allows(self, length: int) -> bool:
        return not self.lengths or length in self.lengths

    @staticmethod
    def of(metadata: Any, name: str) -> _Desc | None:
        desc = getattr(metadata, name, None)
        if desc is None or not desc.national_number_pattern:
            return None  # phonenumbers: such a desc never matches
        return _Desc(desc)


class _RegionRules:
    """"This number has a known type in this region" (_number_type_helper != UNKNOWN): the
    general desc matches and so does any type desc. For each length that the general desc
    allows, one pattern asserts the general pattern (a lookahead to the end) and then tries
    the type patterns that allow that length, so a check is one regex call."""

    __slots__ = ("by_length", "leading")

    def __init__(self, cc: int, region: str, metadata: Any) -> None:
        self.leading = re.compile(metadata.leading_digits) if metadata.leading_digits else None
        self.by_length: dict[int, re.Pattern[str]] = {}
        general = _Desc.of(metadata, "general_desc")
        # is_valid_number_for_region: a region of another calling code is never valid.
        if general is None or (region != "001" and metadata.country_code != cc):
            return
        descs = [d for d in (_Desc.of(metadata, name) for name in _TYPE_DESCS) if d]
        if not metadata.same_mobile_and_fixed_line_pattern:
            mobile = _Desc.of(metadata, "mobile")
            if mobile:
                descs.append(mobile)
        for length in range(_MIN_NSN, _MAX_NSN + 1):
            alternatives = [f"(?:{d.source})" for d in descs if d.allows(length)]
            if alternatives and general.allows(length):
                self.by_length[length] = re.compile(
                    rf"(?=(?:{general.source})\Z)(?:{'|'.join(alternatives)})")

    def known(self, nsn: str) -> bool:
        pattern = self.by_length.get(len(nsn))
        return pattern is not None and pattern.fullmatch(nsn) is not None


class _CountryRules:
    """is_valid_number for one country calling code."""

    def __init__(self, cc: int) -> None:
        from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

        regions = COUNTRY_CODE_TO_REGION_CODE.get(cc, ())
        self.single = len(regions) == 1
        self.regions: list[_RegionRules] = []
        for region in regions:
            metadata = (PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
                        if self.single else PhoneMetadata.metadata_for_region(region.upper()))
            if metadata is not None:
                self.regions.append(_RegionRules(cc, region, metadata))

    def valid(self, nsn: str) -> bool:
        if self.single:
            return bool(self.regions) and self.regions[0].known(nsn)
        for rules in self.regions:  # _region_code_for_number_from_list
            if rules.leading is not None:
                if rules.leading.match(nsn):
                    return rules.known(nsn)
            elif rules.known(nsn):
                return True  # chosen because its type is known, so valid
        return False


@cache
def _rules(cc: int) -> _CountryRules:
    return _CountryRules(cc)
