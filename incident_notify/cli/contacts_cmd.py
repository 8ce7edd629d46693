"""`incident-notify contacts check|list` and `contacts optout add|remove|list`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import JsonOpt
from incident_notify.cli.output import safe as escape
from incident_notify.exit_codes import ExitCode

contacts_app = typer.Typer(help="Check and list contact sources; manage opt-outs.",
                           no_args_is_help=True)
app.add_typer(contacts_app, name="contacts")
optout_app = typer.Typer(help="The opt-out list.", no_args_is_help=True)
contacts_app.add_typer(optout_app, name="optout")

PathsArg = Annotated[list[Path], typer.Argument(help="Contact files (.yaml, .csv, .tsv), "
                                                 "directories of them, or playbooks (their "
                                                 "contact sources).")]
RegionOpt = Annotated[str | None, typer.Option(
    "--region", help="Region for national phone numbers (a code such as US or GB) "
    "[default: default_region from the config or INCIDENT_NOTIFY_REGION, else US]",
    show_default=False)]
OptoutsOpt = Annotated[Path | None, typer.Option(
    "--optouts", help="Opt-out list file [default: from the config or "
    "INCIDENT_NOTIFY_OPTOUTS, else optouts.jsonl next to the audit log]", show_default=False)]


def _sources(paths: list[Path], settings: Any) -> list[Path]:
    """The contact files to read. A playbook among them, or in a folder given (the shipped
    layout keeps them side by side), stands for the contact sources a send of it reads
    (those it names, and the config's `contacts`): `contacts check
    playbooks/dc-power-failure.yaml` checks the people that playbook tells, where its
    lines would otherwise be reported as broken contacts."""
    from incident_notify.contacts import source_files

    found: list[Path] = []
    playbooks = False
    for f in source_files(paths):
        named = _named_by_playbook(f)
        found.extend([f] if named is None else named)
        playbooks = playbooks or named is not None
    return [*found, *settings.contacts] if playbooks else found


def _named_by_playbook(path: Path) -> list[Path] | None:
    """The contact sources of `path` when it is a playbook (top-level `stages:` and a
    `contacts:` list of file names), else None."""
    import re

    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return None
    try:
        if path.stat().st_size > 1_000_000:
            return None  # (a playbook is small; a big YAML file is a contact list)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # reported where it is read as contacts
    if not re.search(r"^stages:", text, re.M):
        return None
    from incident_notify.errors import ProblemsError
    from incident_notify.yamlmap import load_yaml_text

    try:
        data, _ = load_yaml_text(text, str(path))
    except ProblemsError:
        return None
    named = data.get("contacts") if isinstance(data, dict) else None
    if not isinstance(named, list) or not all(isinstance(n, str) for n in named):
        return None
    return [path.parent / n for n in named]


def _settings(region: str | None, optouts: Path | None) -> Any:
    """The same settings every other command reads: config files, environment, options."""
    from incident_notify.config import load_settings

    return load_settings({"default_region": region, "optouts": optouts})


def _store(settings: Any) -> Any:
    from incident_notify.optouts import OptOutStore
    from incident_notify.phones import region_code

    return OptOutStore(settings.optouts_path(), region_code(settings.default_region))


def _checked(store: Any, kind: str, address: str, action: str) -> tuple[str, str]:
    """The opt-out key for a command-line address, or a usage error naming the problem.
    An entry already in the list is found as written even if it is not a valid address
    (older versions recorded such addresses), so that it can be removed."""
    from incident_notify.contacts import InvalidField
    from incident_notify.errors import UsageError

    try:
        key: tuple[str, str] = store.checked_key(kind, address)
    except InvalidField as exc:
        as_written = (kind, address.strip().lower())
        if action == "remove" and any((o["kind"], o["address"]) == as_written
                                      for o in store.all()):
            return as_written
        raise UsageError(f"cannot {action} an opt-out: {exc}", exc.hint) from None
    return key


@contacts_app.command("check")
def check(ctx: typer.Context, paths: PathsArg, region: RegionOpt = None, optouts: OptoutsOpt = None,
          json: JsonOpt = False) -> None:
    """Per source: people, invalid records, reachable per channel, opted out; exit 4 when
    any record is invalid (each reported as file:line: field: problem)."""
    env = environment(ctx)
    from incident_notify.contacts import KINDS, address_field, load_contacts

    env.json = json
    settings = _settings(region, optouts)
    cs = load_contacts(_sources(paths, settings), default_region=settings.default_region)
    store = _store(settings)
    per_source: dict[str, dict[str, Any]] = {
        s.path: {"path": s.path, "people": s.people, "invalid": s.invalid,
                 "reachable": Counter(), "opted_out": 0} for s in cs.sources}
    for c in cs.contacts.values():
        entry = per_source.setdefault(c.source, {"path": c.source, "people": 0, "invalid": 0,
                                                 "reachable": Counter(), "opted_out": 0})
        for kind in KINDS:
            address = c.address_for(address_field(kind))
            if address:
                entry["reachable"][kind] += 1
                if store.is_opted_out(kind, address):
                    entry["opted_out"] += 1
    sources = [{**v, "reachable": {k: v["reachable"].get(k, 0) for k in KINDS}}
               for v in per_source.values()]
    code = int(ExitCode.INVALID_CONTACTS if cs.problems else ExitCode.OK)
    invalid = cs.invalid_records
    if json:
        env.emit_json("contacts check", {"sources": sources, "people": len(cs.contacts),
                                            "invalid": invalid, "problems": len(cs.problems)},
                         exit_code=code, errors=[p.to_dict() for p in cs.problems])
        raise typer.Exit(code)
    from incident_notify.cli.render_results import table

    t = table(env, "source", "people", "invalid", *KINDS, "opted out")
    for s in sources:
        t.add_row(escape(s["path"]), str(s["people"]), str(s["invalid"]),
                  *(str(s["reachable"][k]) for k in KINDS), str(s["opted_out"]))
    con = env.console()
    con.print(t)
    for problem in cs.problems:
        con.print(f"[bold red]invalid:[/] {escape(str(problem))}")
    others = len(cs.problems) - invalid  # a header, an unreadable or missing source
    con.print(f"{len(cs.contacts)} people loaded, {invalid} invalid record(s)"
              + (f", {others} other problem(s)." if others else "."))
    raise typer.Exit(code)


@contacts_app.command("list")
def list_(ctx: typer.Context, paths: PathsArg, group: Annotated[list[str] | None, typer.Option(
              "--group", help="Only people in this group (repeatable).")] = None,
          tag: Annotated[list[str] | None, typer.Option(
              "--tag", help="Only people with this tag (repeatable).")] = None,
          region: RegionOpt = None, json: JsonOpt = False) -> None:
    """People with their groups, tags, preferred channels and addresses; exit 4 when a
    source is missing or has invalid records (each reported on stderr; the others are
    listed)."""
    env = environment(ctx)
    from incident_notify.contacts import load_contacts

    env.json = json
    settings = _settings(region, None)
    cs = load_contacts(_sources(paths, settings), default_region=settings.default_region)
    _refuse_unknown_names(cs, "group", group or [])
    _refuse_unknown_names(cs, "tag", tag or [])
    people = (list(cs.select(groups=group or [], tags=tag or [])) if (group or tag)
              else list(cs.contacts.values()))
    code = int(ExitCode.INVALID_CONTACTS if cs.problems else ExitCode.OK)
    if json:
        env.emit_json("contacts list", {"contacts": [c.to_dict() for c in people]},
                      exit_code=code, errors=[p.to_dict() for p in cs.problems])
        raise typer.Exit(code)
    from incident_notify.cli.render_results import table

    t = table(env, "id", "name", "groups", "tags", "prefers", "phone", "email", "twitter")
    for c in people:
        t.add_row(escape(c.id), escape(c.name), escape(", ".join(sorted(c.groups))),
                  escape(", ".join(sorted(c.tags))), " > ".join(c.channels), c.phone or "",
                  escape(c.email or ""), c.twitter or "")
    env.console().print(t)
    for problem in cs.problems:  # (diagnostics: stderr)
        env.err_console().print(f"[bold red]invalid:[/] {escape(str(problem))}")
    raise typer.Exit(code)


def _refuse_unknown_names(cs: Any, kind: str, given: list[str]) -> None:
    """A group or tag no contact has: said (with the likely one), not listed as nobody,
    which reads as "nobody is on call"."""
    from incident_notify.errors import NotFoundError, did_you_mean

    if not given or not cs.contacts:
        return
    known = {name for c in cs.contacts.values() for name in getattr(c, f"{kind}s")}
    for name in given:
        if name not in known:
            raise NotFoundError(f"no contact has the {kind} {name!r}"
                                + did_you_mean(name, known),
                                hint=f"{kind}s: {', '.join(sorted(known)) or 'none'}")


KindArg = Annotated[str, typer.Argument(help="sms, email or twitter_dm.")]
AddressArg = Annotated[str, typer.Argument(help="Number, email or @handle.")]


def _optout_change(ctx: typer.Context, action: str, kind: str, address: str,
                   optouts: Path | None, region: str | None, json: bool) -> None:
    env = environment(ctx)
    env.json = json
    store = _store(_settings(region, optouts))
    kind, address = _checked(store, kind, address, "record" if action == "add" else "remove")
    if action == "add":
        changed = store.add(kind, address, "manual")
        data = {"kind": kind, "address": address, "added": changed}
        said = "added." if changed else "already opted out."
    else:
        store.remove(kind, address, "manual")
        data, said = {"kind": kind, "address": address, "removed": True}, "removed."
    if json:
        env.emit_json(f"contacts optout {action}", data)
    else:
        env.console().print(f"{address}: {said}", markup=False)


@optout_app.command("add")
def optout_add(ctx: typer.Context, kind: KindArg, address: AddressArg,
               optouts: OptoutsOpt = None, region: RegionOpt = None,
               json: JsonOpt = False) -> None:
    """Record that a person does not want messages on a channel kind."""
    _optout_change(ctx, "add", kind, address, optouts, region, json)


@optout_app.command("remove")
def optout_remove(ctx: typer.Context, kind: KindArg, address: AddressArg,
                  optouts: OptoutsOpt = None, region: RegionOpt = None,
                  json: JsonOpt = False) -> None:
    """Opt a person back in (recorded, never deleted)."""
    _optout_change(ctx, "remove", kind, address, optouts, region, json)


@optout_app.command("list")
def optout_list(ctx: typer.Context, optouts: OptoutsOpt = None, json: JsonOpt = False) -> None:
    """Everyone currently opted out."""
    env = environment(ctx)
    env.json = json
    store = _store(_settings(None, optouts))
    items, problems = store.all(), store.problems()
    if json:
        env.emit_json("contacts optout list", {"optouts": items, "warnings": problems})
        return
    for item in items:
        when = str(item.get("ts") or "")[:19].replace("T", " ")
        env.console().print(f"{item['kind']:<11} {item['address']:<32} "
                            f"{item.get('reason') or '-'} {when + ' UTC' if when else ''}"
                            .rstrip(), markup=False)
    for problem in problems:
        env.err_console().print(f"warning: {problem}", markup=False, highlight=False)
