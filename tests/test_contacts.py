"""Contacts and audiences: validation with line numbers, preferences, opt-outs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from incident_notify.config import Settings
from incident_notify.contacts import load_contacts, normalise_phone
from incident_notify.lifecycle import declare, update
from incident_notify.optouts import OptOutStore
from incident_notify.runtime import open_runtime
from tests.conftest import PLAYBOOKS, json_doc, run_cli

HEADER = "id,name,email,phone,twitter,channels,groups,tags\n"


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("(202) 555-0143", "US", "+12025550143"),
    ("202.555.0143", "US", "+12025550143"),
    ("+1 202 555 0143", "GB", "+12025550143"),
    ("+44 20 7946 0958", "US", "+442079460958"),
    ("0044 20 7946 0958", "US", "+442079460958"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("06 12 34 56 78", "FR", "+33612345678"),
])
def test_e164_normalisation(raw: str, region: str, e164: str) -> None:
    assert normalise_phone(raw, region) == e164


def test_invalid_rows_reported_with_lines_rest_load(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(HEADER
                    + "a,Ann,ann@example.com,+12025550101,,,team,\n"
                    + "b,Ben,not-an-email,+12025550102,,,team,\n"
                    + "c,Cy,cy@example.com,+1 555,,,team,\n"
                    + "d,Di,di@example.com,,@way_too_long_handle_x,,team,\n"
                    + "e,Ed,ed@example.com,,,,team,\n"
                    + "a,Ann again,ann2@example.com,,,,team,\n"
                    + "f,Fay,fay@example.com,,,pager,team,\n")
    cs = load_contacts([path])
    assert sorted(cs.contacts) == ["a", "e"]
    found = {(p.line, p.message.split(":")[0]) for p in cs.problems}
    assert found == {(3, "email"), (4, "phone"), (5, "twitter"), (7, "id"), (8, "channels")}
    assert all(p.file == str(path) for p in cs.problems)
    assert "first defined at" in next(p.message for p in cs.problems if p.line == 7)


def test_yaml_contacts_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "team.yaml"
    path.write_text("contacts:\n"
                    "  - id: a\n    email: a@example.com\n    groups: [oncall]\n"
                    "  - id: b\n    phone: '12'\n"
                    "  - id: c\n    email: c@example.com\n    timezone: Mars/Olympus\n"
                    "  - id: d\n    email: d@example.com\n    groups: [[x, y]]\n"
                    "  - id: e\n    email: e@example.com\n    tags: 7\n    groups: [1, ' ops ']\n")
    cs = load_contacts([path])
    assert list(cs.contacts) == ["a", "e"]
    assert cs.contacts["e"].groups == {"1", "ops"} and cs.contacts["e"].tags == {"7"}
    assert {(p.line, p.message.split(":")[0]) for p in cs.problems} == {
        (5, "phone"), (7, "timezone"), (10, "groups")}


def test_directory_select_and_preferences() -> None:
    cs = load_contacts([PLAYBOOKS / "contacts"])
    assert not cs.problems
    oncall = {c.id for c in cs.select(groups=["oncall"])}
    assert oncall == {"alice", "bob", "dana"}
    assert not list(cs.select())  # an empty selector selects nobody
    assert cs.contacts["cust-004"].channels == ("twitter_dm", "email")
    assert cs.contacts["bob"].phone == "+12025550102"


def test_default_region_any_case_and_unknown_stops_the_load(tmp_path: Path) -> None:
    from incident_notify.errors import ConfigError

    path = tmp_path / "uk.csv"
    path.write_text(HEADER + "a,A,,020 7946 0958,,,,\n")
    assert load_contacts([path], default_region="gb").contacts["a"].phone == "+442079460958"
    with pytest.raises(ConfigError):
        load_contacts([path], default_region="XX")
    proc = run_cli("contacts", "check", str(path), "--region", "XX")
    assert proc.returncode == 12 and "Traceback" not in proc.stderr
    assert "'XX' is not a region code" in proc.stdout + proc.stderr
    env = {"INCIDENT_NOTIFY_REGION": "gb"}
    doc = json_doc(run_cli("contacts", "list", str(path), "--json", env=env))
    assert doc["data"]["contacts"][0]["phone"] == "+442079460958"


def test_optout_cli_normalises_in_the_region_and_refuses_bad_addresses(tmp_path: Path) -> None:
    env = {"INCIDENT_NOTIFY_OPTOUTS": str(tmp_path / "o.jsonl")}
    added = run_cli("contacts", "optout", "add", "sms", "020 7946 0958", "--region", "gb",
                    "--json", env=env)
    assert added.returncode == 0
    assert json_doc(added)["data"] == {"kind": "sms", "address": "+442079460958", "added": True}
    # The dispatcher's store reads national numbers in the configured region too.
    assert OptOutStore(tmp_path / "o.jsonl", "GB").is_opted_out("sms", "020 7946 0958")
    assert OptOutStore(tmp_path / "o.jsonl").is_opted_out("sms", "+44 20 7946 0958")
    for kind, address in [("sms", "12"), ("email", "not-an-email"), ("pager", "x")]:
        bad = run_cli("contacts", "optout", "add", kind, address, env=env)
        assert bad.returncode == 2 and "cannot record an opt-out" in bad.stdout + bad.stderr
        assert "Traceback" not in bad.stderr
    region = run_cli("contacts", "optout", "add", "sms", "+44 20 7946 0958", "--region", "XX",
                     env=env)
    assert region.returncode == 12
    # An entry recorded as written by an older version can still be removed.
    with open(tmp_path / "o.jsonl", "a") as log:
        log.write('{"kind": "sms", "address": "020 7946 0958", "action": "optout", '
                  '"reason": "manual", "ts": "2026-11-01T00:00:00+00:00"}\n')
    assert run_cli("contacts", "optout", "remove", "sms", "020 7946 0958", env=env).returncode == 0
    gone = run_cli("contacts", "optout", "remove", "sms", "020 7946 0958", env=env)
    assert gone.returncode == 2 and "cannot remove an opt-out" in gone.stdout + gone.stderr
    listed = json_doc(run_cli("contacts", "optout", "list", "--json", env=env))
    assert [o["address"] for o in listed["data"]["optouts"]] == ["+442079460958"]


def test_validate_and_preflight_read_contacts_like_a_send(tmp_path: Path,
                                                          audience_pb: Path) -> None:
    """validate uses the configured region; a send's preflight counts records left out
    apart from a source's other problems; list escapes what it prints."""
    people = audience_pb.parent / "people.csv"
    people.write_text(HEADER.strip() + ",company\n"
                      + "t1,Team One,t1@example.com,020 7946 0958,,,team,,Acme\n"
                      + "c1,Cust [red]One[/],c1@example.com,,,,,customer;[/x],Initech\n"
                      + "c2,Bad,not-an-email,,,,,customer,\n")
    checked = run_cli("validate", str(audience_pb), "--json", env={"INCIDENT_NOTIFY_REGION": "gb"})
    errors = [e["message"] for e in json_doc(checked)["errors"]]
    assert checked.returncode == 3 and len(errors) == 2          # the column and c2's email
    assert any("company" in e for e in errors) and any(e.startswith("email") for e in errors)
    assert run_cli("validate", str(audience_pb), env={"INCIDENT_NOTIFY_REGION": "xx"}
                   ).returncode == 12
    env = {"INCIDENT_NOTIFY_REGION": "GB", "INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "a.jsonl"),
           "INCIDENT_NOTIFY_OPTOUTS": str(tmp_path / "o.jsonl")}
    # Contacts that did not load stop a send before anything is sent (a dry run too), with
    # every problem named: people must never silently not be told.
    refused = run_cli("declare", str(audience_pb), "--dry-run", "--sandbox", "--json", env=env)
    doc = json_doc(refused)
    assert refused.returncode == 4 and doc["data"] is None
    messages = [e["message"] for e in doc["errors"]]
    assert any("company" in m for m in messages) and any(m.startswith("email") for m in messages)
    listed = run_cli("contacts", "list", str(people), env={"INCIDENT_NOTIFY_REGION": "GB"})
    # (It lists who loaded, escaped, and names the rest with exit 4.)
    assert listed.returncode == 4 and "[/x]" in listed.stdout and "[red]One[/]" in listed.stdout
    assert "not-an-email" in listed.stderr


def test_optout_store_persists_and_is_thread_safe(tmp_path: Path) -> None:
    store = OptOutStore(tmp_path / "o.jsonl")
    threads = [threading.Thread(target=store.add, args=("sms", f"+1202555{i:04d}", "t"))
               for i in range(50)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    again = OptOutStore(tmp_path / "o.jsonl")
    assert again.is_opted_out("sms", "(202) 555-0007")
    assert len(again.all()) == 50
    again.remove("sms", "+12025550007")
    assert not OptOutStore(tmp_path / "o.jsonl").is_opted_out("sms", "+12025550007")


def test_an_opt_out_recorded_after_a_line_cut_short_by_a_crash_is_kept(tmp_path: Path) -> None:
    """A crash (or a full disk) mid-append leaves a line without its end; the next opt-out
    used to be written straight after it, in one unreadable line: the customer who texted
    STOP kept getting texts."""
    path = tmp_path / "o.jsonl"
    OptOutStore(path).add("sms", "+14155550010")
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:25])  # the next entry, cut short
    store = OptOutStore(path)
    assert store.add("sms", "+14155550011", "STOP")
    assert store.add("email", "carol@example.com")
    again = OptOutStore(path)
    assert again.is_opted_out("sms", "+14155550010")
    assert again.is_opted_out("sms", "+14155550011")
    assert again.is_opted_out("email", "carol@example.com")
    assert len(again.all()) == 3
    assert path.read_bytes().count(b"\n") == 4  # the fragment ended, on a line of its own
    listed = run_cli("contacts", "optout", "list", "--optouts", str(path))
    assert "+14155550011" in listed.stdout, listed.stdout + listed.stderr


def test_contacts_check_cli(tmp_path: Path) -> None:
    ok = run_cli("contacts", "check", str(PLAYBOOKS / "contacts"), "--json")
    doc = json_doc(ok)
    assert ok.returncode == 0 and doc["data"]["people"] == 37
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "x,X,nope,,,,,\n")
    proc = run_cli("contacts", "check", str(bad))
    assert proc.returncode == 4
    assert f"{bad}:2: email" in proc.stdout
    crm = tmp_path / "crm.csv"
    crm.write_text("id,email,company\na,a@example.com,Acme\nb,b@example,Initech\n")
    proc = run_cli("contacts", "check", str(crm))
    assert "1 people loaded, 1 invalid record(s), 1 other problem(s)." in proc.stdout
    assert "'b@example'" in proc.stdout
    data = json_doc(run_cli("contacts", "check", str(crm), "--json"))["data"]
    assert (data["people"], data["invalid"], data["problems"]) == (1, 1, 2)


def test_contacts_list_of_a_missing_or_broken_source_says_so_and_exits_4(
        tmp_path: Path) -> None:
    typo = run_cli("contacts", "list", str(tmp_path / "custmers.csv"))
    assert typo.returncode == 4 and "contacts source not found" in typo.stderr
    crm = tmp_path / "crm.csv"
    crm.write_text("id,email\na,a@example.com\nb,b@example\n")
    proc = run_cli("contacts", "list", str(crm))
    assert proc.returncode == 4 and "a@example.com" in proc.stdout
    assert f"{crm}:3: email" in proc.stderr and "b@example" not in proc.stdout
    doc = json_doc(run_cli("contacts", "list", str(crm), "--json"))
    assert (doc["ok"], doc["exit_code"], len(doc["data"]["contacts"])) == (False, 4, 1)
    assert run_cli("contacts", "list", str(PLAYBOOKS / "contacts")).returncode == 0


def test_a_playbook_given_to_contacts_check_or_list_stands_for_its_contact_sources(
        tmp_path: Path) -> None:
    """`contacts check playbook.yaml` (or the playbooks' folder) checks the people the
    playbook tells, plus the config's contacts, as a send reads them; it used to report
    the playbook's own lines as broken contacts."""
    pb = PLAYBOOKS / "dc-power-failure.yaml"
    for paths in ([str(pb)], [str(PLAYBOOKS)], [str(pb), str(PLAYBOOKS / "contacts")]):
        proc = run_cli("contacts", "check", *paths, "--json")
        data = json_doc(proc)["data"]
        assert proc.returncode == 0, proc.stdout
        assert (data["people"], data["invalid"]) == (37, 0)
        assert sorted(Path(s["path"]).name for s in data["sources"]) == [
            "customers.csv", "team.yaml"]
    extra = tmp_path / "extra.csv"
    extra.write_text(HEADER + "zed,Zed,zed@example.com,,,,,\n")
    listed = run_cli("contacts", "list", str(pb), "--json",
                     env={"INCIDENT_NOTIFY_CONTACTS": str(extra)})
    ids = {c["id"] for c in json_doc(listed)["data"]["contacts"]}
    assert listed.returncode == 0 and "zed" in ids and "alice" in ids and len(ids) == 38
    alone = run_cli("contacts", "list", str(extra), "--json",
                    env={"INCIDENT_NOTIFY_CONTACTS": str(PLAYBOOKS / "contacts")})
    assert [c["id"] for c in json_doc(alone)["data"]["contacts"]] == ["zed"]


def test_csv_header_is_checked_once_and_read_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    path.write_text("ID,Name,EMAIL,Phone,Company,phone\n"
                    "a,Ann,ann@example.com,+12025550101,Acme,+12025559999\n"
                    "b,Ben,ben@example.com,,Initech,\n")
    cs = load_contacts([path])
    assert sorted(cs.contacts) == ["a", "b"]
    assert cs.contacts["a"].phone == "+12025550101"   # the first 'phone' column
    assert [(p.line, p.message) for p in cs.problems] == [
        (1, "column 'company' is not a contact field and is ignored"),
        (1, "column 'phone' appears twice; the later one is ignored")]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_spreadsheet_saved_with_semicolons_or_tabs_reads_as_with_commas(
        tmp_path: Path, sep: str) -> None:
    """Where the decimal separator is a comma, spreadsheets save "CSV" split by ';' (and
    quote what holds one); a tab-separated export is common too."""
    rows = [["id", "name", "email", "phone", "channels", "tags"],
            ["a", "Ann, ops", "ann@example.com", "+1 202 555 0101", "sms;email", "team"],
            ["b", "Ben", "ben@example.com", "", "email", "team;customer"]]

    def save(name: str, delimiter: str) -> Path:
        import csv

        path = tmp_path / name
        with open(path, "w", newline="", encoding="utf-8-sig") as handle:
            handle.write("\r\n")  # (a blank line before the header)
            csv.writer(handle, delimiter=delimiter).writerows(rows)
        return path

    commas = load_contacts([save("commas.csv", ",")])
    other = load_contacts([save("other.csv", sep)])
    assert not other.problems and not commas.problems

    def read(cs: Any) -> dict[str, Any]:
        return {k: c._replace(source="") for k, c in cs.contacts.items()}

    assert read(other) == read(commas) and len(other.contacts) == 2
    assert other.contacts["a"].channels == ("sms", "email")


@pytest.mark.parametrize("suffix", [".tsv", ".txt", ".TSV"])
def test_a_tab_separated_export_named_tsv_or_txt_reads_as_a_csv(
        tmp_path: Path, suffix: str) -> None:
    """A spreadsheet's "Unicode Text" export is named .txt, and tab-separated files .tsv.
    Either was read as YAML: "expected a list of contacts", nobody loaded, exit 4, where
    the same bytes named .csv load. A directory now holds .tsv files too (not .txt: a
    README there is no contact list)."""
    text = "id\tname\temail\r\na\tAnn\tann@example.com\r\nb\tBen\tben@example.com\r\n"
    named = tmp_path / f"export{suffix}"
    named.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    cs = load_contacts([named])
    assert not cs.problems and sorted(cs.contacts) == ["a", "b"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"people{suffix}").write_text(text)
    (folder / "README.md").write_text("# who is who\n")
    read = load_contacts([folder])
    if suffix == ".txt":
        assert not read.contacts and read.problems  # (a folder of no contact file: said)
    else:
        assert not read.problems and sorted(read.contacts) == ["a", "b"]


def test_a_contacts_file_that_is_neither_csv_nor_yaml_says_which_formats_are_read(
        tmp_path: Path) -> None:
    """A file of another kind (a vCard, an export named .dat) was read as YAML and said only
    "expected a list of contacts"."""
    odd = tmp_path / "people.vcf"
    odd.write_text("BEGIN:VCARD\nFN:Ann\nEND:VCARD\n")
    [problem] = load_contacts([odd]).problems
    assert problem.hint is not None and ".csv" in problem.hint and ".yaml" in problem.hint


def test_a_file_that_is_not_text_or_has_a_long_stray_column_is_said_briefly(
        tmp_path: Path) -> None:
    """A binary file named .csv (an .xlsx renamed, a wrong export) printed its first "row"
    as a column name: hundreds of characters of noise, then "no 'id' column". It is now
    one problem: the header row is not UTF-8 text."""
    binary = tmp_path / "people.csv"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(128, 256)) * 4
                       + b"\n" + bytes(range(128, 256)) + b",\n")  # (an .xlsx is a zip)
    [problem] = load_contacts([binary]).problems
    assert "header row is not UTF-8 text" in problem.message and len(problem.message) < 120
    stray = tmp_path / "stray.csv"
    stray.write_text("id,name,email," + "x" * 300 + "\na,Ann,ann@example.com,\n")
    [long] = load_contacts([stray]).problems
    assert "is not a contact field" in long.message and len(long.message) < 120


@pytest.mark.parametrize("sep", [";", ",", "\t"], ids=["semicolon", "comma", "tab"])
def test_excels_sep_line_names_the_separator_and_is_not_the_header(
        tmp_path: Path, sep: str) -> None:
    """A CSV made for Excel may start with "sep=;". It was taken for the header: "column
    'sep=' is not a contact field", "no 'id' column", nobody loaded (exit 4)."""
    path = tmp_path / "people.csv"
    path.write_text(f"sep={sep}\nid{sep}name{sep}email\na{sep}Ann{sep}ann@example.com\n"
                    f"b{sep}Ben{sep}not-an-address\n")
    cs = load_contacts([path])
    assert sorted(cs.contacts) == ["a"] and cs.contacts["a"].line == 3
    assert [p.line for p in cs.problems] == [4]


def test_contacts_list_of_a_mistyped_group_or_tag_says_so() -> None:
    """`contacts list --group oncal` printed an empty table, exit 0: "nobody is on call".
    A group or tag that no contact has is said, with the likely one (exit 9)."""
    for option, typo, likely in (("--group", "oncal", "oncall"), ("--tag", "custmer",
                                                                  "customer")):
        proc = run_cli("contacts", "list", str(PLAYBOOKS / "contacts"), option, typo)
        assert proc.returncode == 9 and f"did you mean {likely!r}?" in proc.stderr
        assert proc.stdout == ""
    known = run_cli("contacts", "list", str(PLAYBOOKS / "contacts"), "--group", "exec",
                    "--json")
    assert known.returncode == 0
    assert {c["id"] for c in json_doc(known)["data"]["contacts"]} and known.stderr == ""


def test_a_misspelt_contact_field_is_answered_with_the_likely_one(tmp_path: Path) -> None:
    table = tmp_path / "people.csv"
    table.write_text("id,name,emial,phone\na,Ann,ann@example.com,+12025550101\n")
    listed = tmp_path / "people.yaml"
    listed.write_text("- id: b\n  name: Ben\n  phnoe: '+12025550102'\n")
    messages = [p.message for p in load_contacts([table, listed]).problems]
    assert any("did you mean 'email'?" in m for m in messages), messages
    assert any("did you mean 'phone'?" in m for m in messages), messages


def test_a_row_split_by_the_files_own_separator_names_it_in_the_hint(tmp_path: Path) -> None:
    semi = tmp_path / "semi.csv"
    semi.write_text("id;name;tags\na;Ann;oncall;primary\n")
    [problem] = load_contacts([semi]).problems
    assert problem.hint is not None and "';'" in problem.hint, problem


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_spreadsheets_unicode_text_export_reads_as_its_csv_utf8_does(
        tmp_path: Path, encoding: str) -> None:
    """Excel's "Unicode Text" is UTF-16 with a byte-order mark, tab-separated, CRLF. It was
    read as UTF-8: nine garbled column names and no person loaded. A broken UTF-16 pair
    is its row's problem, at its line, as a line that is not UTF-8 is."""
    text = ("id\tname\temail\tphone\r\na\tAnn Ø\tann@example.com\t+1 202 555 0101\r\n"
            "b\tBen 李\tben@example.com\t\r\nc\tCy\tc@example.com\t\r\n")
    utf8 = tmp_path / "utf8.csv"
    utf8.write_bytes(text.encode("utf-8-sig"))
    utf16 = tmp_path / "unicode.csv"
    bom = b"\xff\xfe" if encoding.endswith("le") else b"\xfe\xff"
    utf16.write_bytes(bom + text.encode(encoding))
    want, got = load_contacts([utf8]), load_contacts([utf16])
    assert not got.problems and len(got.contacts) == 3
    assert ({k: c._replace(source="") for k, c in got.contacts.items()}
            == {k: c._replace(source="") for k, c in want.contacts.items()})
    lone = "\udc00".encode(encoding, "surrogatepass")  # a low surrogate with no high one
    broken = tmp_path / "broken.csv"
    before, after = text.split("Ben")
    broken.write_bytes(bom + (before + "B").encode(encoding) + lone
                       + ("n" + after).encode(encoding))
    cs = load_contacts([broken])
    assert sorted(cs.contacts) == ["a", "c"]
    assert [(p.line, p.message) for p in cs.problems] == [(3, "row: not UTF-16 text")]


@pytest.mark.parametrize(("text", "message"), [
    ("", "no header row"),
    ("name,email\nAnn,ann@example.com\n", "no 'id' column: no row can be loaded"),
])
def test_csv_without_a_usable_header(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "people.csv"
    path.write_text(text)
    cs = load_contacts([path])
    assert not cs.contacts
    assert [(p.file, p.line, p.message) for p in cs.problems] == [(str(path), 1, message)]


def test_csv_rows_quoting_blank_rows_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(HEADER
                    + 'a,"Okafor, Alice",alice@example.com,,,,team,\n'      # quoted comma
                    + "b,Smith, Bob,bob@example.com,,,,team,customer\n"     # unquoted comma
                    + "\n"                                                  # blank line
                    + ",,,,,,,\n"                                           # empty row
                    + 'c,"Multi\nLine",c@example.com,,,,team,\n'           # lines 6-7
                    + "d,Dee,not-an-email\n"                                # short row
                    + "e,Eve,eve@example.com,,,,team,,,\n"                   # blank extras
                    + "f,Fox, Fay,fay@example.com,,,,team,\n")              # shifted, blank
    cs = load_contacts([path])
    assert sorted(cs.contacts) == ["a", "c", "e"]
    assert cs.contacts["a"].name == "Okafor, Alice"
    assert cs.contacts["c"].line == 6 and cs.contacts["e"].line == 9
    # A shifted row whose extra value is blank looks like trailing commas: the field that
    # the shift broke reports it.
    assert [(p.line, p.message.split(":")[0]) for p in cs.problems] == [
        (3, "row"), (8, "email"), (10, "email")]
    wide = cs.problems[0]
    assert "9 values but the header has 8 columns" in wide.message and "quotes" in wide.hint


def test_csv_blank_lines_trailing_columns_and_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(b"\n  \nid,name,email,,\n"                       # blank lines, then header
                     b"a,Ann,a@example.com,,\n"
                     b" , ,  ,,\n"                                    # spaces only: skipped
                     b"b,Bj\xf6rn,b@example.com,,\n"                  # latin-1, not UTF-8
                     b"c,Cy,c@example.com,,\n")
    problems: list = []
    from incident_notify.contacts import iter_contacts

    assert [c.id for c in iter_contacts([path], problems=problems)] == ["a", "c"]
    assert [(p.line, p.message) for p in problems] == [(6, "row: not UTF-8 text")]
    assert "UTF-8" in problems[0].hint


def test_undecodable_lines_found_across_read_blocks(tmp_path: Path) -> None:
    """Lines that are not UTF-8 are found in a file of several 1 MiB blocks, wherever the
    block edges fall, and only their records are left out."""
    path = tmp_path / "big.csv"
    bad = {2_000, 30_001}
    offset, block = len(HEADER), 1 << 20
    with open(path, "wb") as out:
        out.write(HEADER.encode())
        for i in range(2, 60_002):  # line numbers
            latin = b"p%d,Bj\xf6rn %d,p%d@example.com,,,,,\n" % (i, i, i)
            if offset // block != (offset + len(latin) - 1) // block:
                bad.add(i)  # this line straddles a block edge
            line = latin if i in bad else latin.replace(b"\xf6", "ö".encode())
            out.write(line)
            offset += len(line)
    assert offset > 2 * block and len(bad) == 4
    cs = load_contacts([path])
    assert len(cs.contacts) == 60_000 - len(bad)
    assert {p.line for p in cs.problems} == bad
    assert cs.contacts["p3"].name == "Björn 3"


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 64])
def test_undecodable_line_scan_at_any_block_size(tmp_path: Path, block: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Block edges inside a line or inside a multibyte character change nothing."""
    from incident_notify import contacts

    lines = ["id,name", "a,Zoë ö", "b,Bj\udcf6rn", "", "c,日本語", "d,\udcff", "e,ok"]
    path = tmp_path / "x.csv"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    monkeypatch.setattr(contacts, "_BLOCK", block)
    assert contacts._undecodable_lines(path) == [3, 6]


def test_yaml_booleans_and_non_mappings_are_invalid_records(tmp_path: Path) -> None:
    path = tmp_path / "team.yaml"
    path.write_text("- id: a\n  email: a@example.com\n  twitter: no\n"
                    "- just-a-string\n"
                    "- id: b\n  email: b@example.com\n  twitter: \"no\"\n")
    cs = load_contacts([path, path])  # named twice: read once
    assert list(cs.contacts) == ["b"] and cs.contacts["b"].twitter == "@no"
    assert [(p.line, p.message) for p in cs.problems] == [
        (1, "twitter: expected text, not false"), (4, "record: a contact must be a mapping "
                                                    "of fields")]
    assert cs.invalid_records == 2


def test_iter_contacts_streams_rows(tmp_path: Path) -> None:
    """A source is read as it is consumed: a later row's problem is not known yet."""
    from incident_notify.contacts import iter_contacts

    path = tmp_path / "people.csv"
    path.write_text(HEADER + "a,A,a@example.com,,,,,\n" + "b,B,bad,,,,,\n")
    problems: list = []
    stream = iter_contacts([path], problems=problems)
    assert next(stream).id == "a" and problems == []
    assert list(stream) == [] and [p.line for p in problems] == [3]


def test_100000_row_csv_loads_with_every_row_checked(tmp_path: Path) -> None:
    """bench/contacts.py times this; here every row's outcome is checked."""
    path = tmp_path / "customers.csv"
    bad_phone, bad_email = set(range(0, 100_000, 1000)), set(range(7, 100_000, 997))
    with open(path, "w") as out:
        out.write(HEADER)
        for i in range(100_000):
            area = 202 + (i // 10_000) % 7 * 100
            phone = (f"+1 {area} 555 {i % 10_000:04d}", f"({area}) 555-{i % 10_000:04d}",
                     f"+44 20 7946 {i % 10_000:04d}")[i % 3]
            out.write(f"c{i},Person {i},{'bad@' if i in bad_email else f'p{i}@example.com'},"
                      f"{'+1 555' if i in bad_phone else phone},@user{i},sms;email,"
                      f"g{i % 10},customer\n")
    cs = load_contacts([path])
    rejected = bad_phone | bad_email
    assert len(cs.contacts) == 100_000 - len(rejected)
    assert {p.line - 2 for p in cs.problems} == rejected
    assert cs.contacts["c1"].phone == "+12025550001"     # national, formatted
    assert cs.contacts["c2"].phone == "+442079460002"    # international
    assert cs.contacts["c99999"].phone == "+14025559999"
    assert cs.contacts["c5"].email == "p5@example.com" and cs.contacts["c5"].line == 7
    # Repeated list values are shared, not copied per person.
    assert cs.contacts["c1"].tags is cs.contacts["c99999"].tags == frozenset({"customer"})
    assert cs.contacts["c1"].channels is cs.contacts["c2"].channels == ("sms", "email")


# ------------------------------------------------------------------ audiences end to end
AUDIENCE_PB = """\
name: aud
title: Audience rules
severity: sev2
contacts: [people.csv]
channels:
  sms:
    type: sms
    sender: "+15005550006"
    rate_per_second: 500
  mail:
    type: email
    sender: ops@acme.example
    rate_per_second: 500
audiences:
  team:
    kind: internal
    select: {groups: [team]}
    channels: [sms, mail]
  customers:
    kind: customers
    select: {tags: [customer]}
    channels: [sms, mail]
stages:
  investigating:
    messages:
      sms: "[{{ incident.id }}] investigating"
      email: {subject: "Investigating", text: "investigating"}
  resolved:
    messages:
      sms: "[{{ incident.id }}] resolved"
      email: {subject: "Resolved", text: "resolved"}
"""


@pytest.fixture
def audience_pb(tmp_path: Path) -> Path:
    (tmp_path / "pb").mkdir()
    (tmp_path / "pb" / "people.csv").write_text(
        HEADER
        + "t1,Team One,t1@example.com,+12025550201,,,team,\n"
        + "c1,Cust SMS,c1@example.com,+12025550301,,sms;email,,customer\n"
        + "c2,Cust Mail,c2@example.com,+12025550302,,email;sms,,customer\n"
        + "c3,Cust Stop,c3@example.com,+12025550303,,sms;email,,customer\n"
        + "both,Team And Customer,b@example.com,+12025550401,,sms,team,customer\n")
    path = tmp_path / "pb" / "aud.yaml"
    path.write_text(AUDIENCE_PB)
    return path


def _rt(tmp_path: Path, sandbox: Any) -> Any:
    return open_runtime(Settings(audit_log=tmp_path / "a.jsonl",
                                 optouts=tmp_path / "optouts.jsonl", sandbox=True),
                        sandbox=sandbox)


def test_preference_order_and_duplicates_collapse(tmp_path: Path, sandbox: Any,
                                                  audience_pb: Path) -> None:
    outcome = declare(_rt(tmp_path, sandbox), audience_pb, {})
    assert outcome.exit_code == 0
    sms = [r["to"] for r in sandbox.twilio.received.all()]
    mail = [r for m in sandbox.smtp.received.all() for r in m["rcpt_tos"]]
    assert "+12025550301" in sms and "c1@example.com" not in mail   # prefers sms
    assert "c2@example.com" in mail and "+12025550302" not in sms   # prefers email
    assert "+12025550201" in sms and "t1@example.com" in mail       # internal: every channel
    assert sms.count("+12025550401") == 1                           # team and customer: once


def test_stop_reply_becomes_an_optout_customers_skip_internal_ignore(
        tmp_path: Path, sandbox: Any, audience_pb: Path) -> None:
    rt = _rt(tmp_path, sandbox)
    sandbox.twilio.add_stop("+12025550303")
    sandbox.twilio.add_stop("+12025550201")  # an internal member replied STOP too
    first = declare(rt, audience_pb, {})
    store = OptOutStore(tmp_path / "optouts.jsonl")
    assert store.is_opted_out("sms", "+12025550303")
    assert list(rt.audit.records(event_prefix="optout.added"))
    # c3 was moved to their next channel (email) in the same update.
    assert "c3@example.com" in [r for m in sandbox.smtp.received.all() for r in m["rcpt_tos"]]
    assert first.exit_code == 0
    sandbox.reset()
    second = update(rt, first.incident_id, stage="resolved", sets={})
    sms = [r["to"] for r in sandbox.twilio.received.all()]
    mail = [r for m in sandbox.smtp.received.all() for r in m["rcpt_tos"]]
    assert "+12025550303" not in sms and "c3@example.com" in mail   # customer: opt-out honoured
    assert "+12025550201" in sms                                    # internal: ignores opt-out
    assert second.result is not None


def test_an_opt_out_typed_by_hand_is_honoured_and_an_unreadable_line_is_said(
        tmp_path: Path, sandbox: Any, audience_pb: Path) -> None:
    """The list is a text file an operator may edit. A number typed as people write it
    was listed but never matched (the list was keyed as written, looked up normalised):
    the customer kept getting texts. A line that cannot be read was skipped in silence:
    whoever it named was contacted and nobody knew. Now the number is the number, and an
    unreadable line is a warning before the send, in the record, and in `optout list`
    (by its number only: a line holds a person's address)."""
    optouts = tmp_path / "optouts.jsonl"
    optouts.write_text(
        '{"kind": "sms", "address": "(202) 555-0303", "action": "optout"}\n'
        '{"kind": "email", "address": "c2@example.com", "action": "optout"\n'
        '{"kind": "email", "address": "c1@example.com"}\n'
        "\n"
        '{"kind": "sms", "address": "not a number", "action": "optout"}\n')
    with optouts.open("ab") as raw:  # (a line saved in another encoding)
        raw.write('{"kind": "email", "address": "zoë@example.com", "action": "optout"}\n'
                  .encode("latin-1"))
    outcome = declare(_rt(tmp_path, sandbox), audience_pb, {})
    sms = [r["to"] for r in sandbox.twilio.received.all()]
    mail = [r for m in sandbox.smtp.received.all() for r in m["rcpt_tos"]]
    assert "+12025550303" not in sms and "c3@example.com" in mail
    assert outcome.preflight is not None
    warned = [w for w in outcome.preflight.stats.warnings if "opt-out list" in w]
    assert len(warned) == 1 and "lines 2, 3, 5, 6 cannot be read" in warned[0], warned
    assert "c2@example.com" not in warned[0]
    recorded = [r for r in _rt(tmp_path, sandbox).audit.records(event_prefix="update.planned")]
    assert any(warned[0] in w for r in recorded for w in r.payload.get("warnings", []))
    listed = run_cli("contacts", "optout", "list", "--optouts", str(optouts))
    assert listed.returncode == 0 and "+12025550303" in listed.stdout
    assert "lines 2, 3, 5, 6 cannot be read" in listed.stderr, listed.stderr


def _unwritable(path: Path) -> bool:
    """Make `path` a file nobody may append to (read-only; as root, which ignores that,
    immutable where the file system allows it); False when neither holds here."""
    import subprocess

    path.touch()
    path.chmod(0o444)
    for attempt in ([], ["chattr", "+i", str(path)]):
        if attempt and subprocess.run(attempt, capture_output=True).returncode != 0:
            return False
        try:
            with open(path, "a"):
                pass
        except OSError:
            return True
    return False


def test_a_stop_reply_whose_opt_out_list_cannot_be_written_does_not_stop_the_fan_out(
        tmp_path: Path, sandbox: Any, audience_pb: Path) -> None:
    """A customer replied STOP while the opt-out list was read-only (a shared file, a full
    disk): the failed append ended the whole fan-out as a bug. The opt-out stays on
    record in the audit log, the customer hears on their next channel, everyone else is
    reached."""
    import subprocess

    listed = tmp_path / "optouts.jsonl"
    if not _unwritable(listed):
        pytest.skip("no way to make a file unwritable here")
    try:
        rt = _rt(tmp_path, sandbox)
        sandbox.twilio.add_stop("+12025550303")
        seen: list[tuple[str, Any]] = []
        outcome = declare(rt, audience_pb, {},
                          progress=lambda kind, d, info: seen.append((kind, dict(info))))
        assert outcome.result is not None and outcome.result.fatal is None, outcome.result
        [warning] = [info["reason"] for kind, info in seen if kind == "warning"]
        assert "could not be written" in warning and "contacts optout add" in warning
        assert outcome.exit_code == 0
        [recorded] = list(rt.audit.records(event_prefix="optout.added"))
        assert "could not be written" in recorded.payload["list_error"]
        assert "c3@example.com" in [r for m in sandbox.smtp.received.all()
                                    for r in m["rcpt_tos"]]
        assert listed.read_text() == ""
    finally:
        subprocess.run(["chattr", "-i", str(listed)], capture_output=True)


@pytest.mark.parametrize("raw", ["a..b@example.com", ".a@example.com", "a@localhost",
                                 "a@exa mple.com", "a@-example.com", "no-at-sign",
                                 "a@example..com"])
def test_email_fast_path_rejects_what_the_validator_rejects(raw: str) -> None:
    from email_validator import EmailNotValidError, validate_email

    from incident_notify.contacts import InvalidField, normalise_email

    with pytest.raises(EmailNotValidError):
        validate_email(raw, check_deliverability=False)
    with pytest.raises(InvalidField) as info:
        normalise_email(raw)
    assert repr(raw) in info.value.problem  # the address as written, not a probe of its domain


def test_email_fast_path_normalises_like_the_validator() -> None:
    from email_validator import validate_email

    from incident_notify.contacts import normalise_email

    for raw in ["Carol.Mendes@Customer1.Example.ORG", "o'brien+ops@example.com",
                "ünïcode@example.com"]:
        assert normalise_email(raw) == validate_email(raw, check_deliverability=False).normalized
