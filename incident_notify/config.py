"""Effective settings and where each came from; secrets from the environment or a file.

Precedence, lowest first: built-in defaults, the user config file
(``<user config dir>/incident-notify/incident-notify.toml``), ``./incident-notify.toml``,
environment variables (``INCIDENT_NOTIFY_*``), command-line options.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from incident_notify.errors import ConfigError

CONFIG_NAME = "incident-notify.toml"
# Credentials the built-in channels read; `config show` masks them.
KNOWN_SECRETS = (
    "TWITTER_API_KEY", "TWITTER_API_SECRET", "TWITTER_ACCESS_TOKEN",
    "TWITTER_ACCESS_TOKEN_SECRET", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN",
    "SMTP_USERNAME", "SMTP_PASSWORD", "INCIDENT_NOTIFY_AUDIT_REDACT_KEY",
)
_ENV = {
    "audit_log": "INCIDENT_NOTIFY_AUDIT_LOG",
    "optouts": "INCIDENT_NOTIFY_OPTOUTS",
    "secrets_file": "INCIDENT_NOTIFY_SECRETS_FILE",
    "playbooks_dir": "INCIDENT_NOTIFY_PLAYBOOKS",
    "contacts": "INCIDENT_NOTIFY_CONTACTS",
    "sandbox": "INCIDENT_NOTIFY_SANDBOX",
    "default_region": "INCIDENT_NOTIFY_REGION",
    "redact_recipients": "INCIDENT_NOTIFY_REDACT_RECIPIENTS",
}


def state_dir() -> Path:
    from platformdirs import user_state_dir

    return Path(user_state_dir("incident-notify"))


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("incident-notify"))


@dataclass
class Settings:
    playbooks_dir: Path = Path("playbooks")
    contacts: list[Path] = field(default_factory=list)
    """Extra contact sources used on top of those a playbook names."""
    audit_log: Path | None = None
    optouts: Path | None = None
    secrets_file: Path | None = None
    sandbox: bool = False
    default_region: str = "US"
    redact_recipients: bool = False
    endpoints: dict[str, str] = field(default_factory=dict)
    """Endpoint overrides from the config file: environment variable name -> value."""
    accounts: dict[str, dict[str, str]] = field(default_factory=dict)
    """[accounts.NAME] tables: endpoint overrides and a credentials prefix per account."""
    sources: dict[str, str] = field(default_factory=dict)

    def audit_path(self) -> Path:
        """The log named by the user, else the default one; a sandbox run that names none
        records into its own log, never the real incidents' record."""
        if self.audit_log is not None:
            return self.audit_log
        return state_dir() / ("sandbox-audit.jsonl" if self.sandbox else "audit.jsonl")

    def optouts_path(self) -> Path:
        return self.optouts or self.audit_path().parent / "optouts.jsonl"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("sources", "accounts", "endpoints"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = [str(v) for v in value]
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = {"value": value, "source": self.sources.get(f.name, "default")}
        out["endpoints"] = {"value": dict(self.endpoints),
                            "source": self.sources.get("endpoints", "default")}
        out["accounts"] = {"value": {n: dict(a) for n, a in self.accounts.items()},
                           "source": self.sources.get("accounts", "default")}
        out["audit_log"]["effective"] = str(self.audit_path())
        out["optouts"]["effective"] = str(self.optouts_path())
        return out


def _coerce(name: str, raw: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if name == "contacts":
            items = raw.split(os.pathsep) if isinstance(raw, str) else list(raw)
            return [Path(str(i)) for i in items if str(i)]
        if kind in ("bool",):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if "Path" in str(kind):
            return Path(str(raw)).expanduser()
        if name == "default_region":
            return str(raw).strip().upper()  # checked when contacts are read
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {name}: {exc}") from None


def config_files(cwd: Path | None = None) -> list[Path]:
    return [config_dir() / CONFIG_NAME, (cwd or Path.cwd()) / CONFIG_NAME]


def load_settings(overrides: Mapping[str, Any] | None = None, cwd: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    settings = Settings()
    names = {f.name for f in fields(Settings)} - {"sources", "accounts", "endpoints"}
    from incident_notify.files import InputFileError, read_input

    for path in config_files(cwd):
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(read_input(path).decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}",
                              hint="fix the file or remove it") from None
        except InputFileError as exc:
            raise ConfigError(f"{path}: {exc.message}", hint=exc.hint) from None
        section = data.get("incident-notify", data)
        for key, value in section.items():
            if key in ENDPOINT_SETTINGS:
                settings.endpoints[ENDPOINT_SETTINGS[key]] = _endpoint_value(path, key, value)
                settings.sources["endpoints"] = str(path)
                continue
            if key == "accounts":
                settings.accounts.update(_accounts(path, value))
                settings.sources["accounts"] = str(path)
                continue
            if key not in names:
                raise ConfigError(f"{path}: unknown setting {key!r}",
                                  hint=f"known settings: {', '.join(sorted(names))}")
            if key in ("secrets", "password", "token"):
                raise ConfigError(f"{path}: secrets do not belong in the config file")
            if key == "sandbox":
                # A file in the working directory must never turn a real send into a
                # rehearsal: sandbox mode comes from --sandbox or INCIDENT_NOTIFY_SANDBOX.
                raise ConfigError(f"{path}: 'sandbox' cannot be set in a config file",
                                  hint="use --sandbox, or INCIDENT_NOTIFY_SANDBOX=1 in the "
                                  "environment of a rehearsal")
            resolved = _coerce(key, value, str(path))
            if isinstance(resolved, Path) and not resolved.is_absolute():
                resolved = path.parent / resolved
            if key == "contacts":
                resolved = [p if p.is_absolute() else path.parent / p for p in resolved]
            setattr(settings, key, resolved)
            settings.sources[key] = str(path)
    for key, var in _ENV.items():
        if env.get(var):
            setattr(settings, key, _coerce(key, env[var], var))
            settings.sources[key] = f"env {var}"
    for key, value in (overrides or {}).items():
        if value is None or value == [] or (isinstance(value, bool) and not value):
            continue
        setattr(settings, key, _coerce(key, value, f"--{key}"))
        settings.sources[key] = "command line"
    return settings


# ------------------------------------------------------------------------ secrets
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def read_secrets_file(path: Path) -> dict[str, str]:
    """A dotenv-style file: NAME=value lines, '#' comments, optional quotes and 'export'."""
    from incident_notify.files import InputFileError, check_input

    try:
        info = check_input(path)
        text = path.read_text(encoding="utf-8")
    except InputFileError as exc:
        raise ConfigError(f"secrets file {path} {exc.message}", hint=exc.hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read secrets file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}",
                          hint="check --secrets / INCIDENT_NOTIFY_SECRETS_FILE") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Open to others: refuse rather than use credentials someone else can read or
        # change (a group-writable file could point the credentials elsewhere).
        raise ConfigError(f"secrets file {path} is open to other users "
                          f"(mode {stat.S_IMODE(info.st_mode):04o})", hint=f"chmod 600 {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(f"secrets file {path} belongs to another user",
                          hint="use a secrets file you own (chown, or copy it)")
    secrets: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"{path}:{number}: expected NAME=value",
                              hint="one NAME=value per line; '#' starts a comment")
        value = match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if match.group(1) in ENDPOINT_VARIABLES:
            raise ConfigError(f"{path}:{number}: {match.group(1)} is an endpoint, not a "
                              "secret", hint="endpoints come from the environment or the "
                              "config file, where the preflight shows them")
        secrets[match.group(1)] = value
    return secrets


ENDPOINT_SETTINGS = {
    "twitter_api_base": "INCIDENT_NOTIFY_TWITTER_API_BASE",
    "twilio_api_base": "INCIDENT_NOTIFY_TWILIO_API_BASE",
    "smtp_url": "INCIDENT_NOTIFY_SMTP_URL",
    "smtp_cafile": "INCIDENT_NOTIFY_SMTP_CAFILE",
}
"""Config file keys (top level, or in an [accounts.NAME] table) -> the variable the
channels read. The environment's variables of the same names apply too."""
ENDPOINT_VARIABLES = frozenset(ENDPOINT_SETTINGS.values())


def _endpoint_value(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: {key} must be a non-empty string")
    return value.strip()


def _accounts(path: Path, value: Any) -> dict[str, dict[str, str]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: accounts must be a table of [accounts.NAME] tables")
    out: dict[str, dict[str, str]] = {}
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [accounts.{name}] must be a table")
        entry: dict[str, str] = {}
        for key, item in table.items():
            if key == "credentials_prefix":
                if not isinstance(item, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", item):
                    raise ConfigError(f"{path}: [accounts.{name}] credentials_prefix must be "
                                      "upper-case letters, digits and _ (e.g. ACME_EU_)")
                entry[key] = item
            elif key in ENDPOINT_SETTINGS:
                entry[ENDPOINT_SETTINGS[key]] = _endpoint_value(path, key, item)
            else:
                raise ConfigError(f"{path}: [accounts.{name}] unknown key {key!r}",
                                  hint="known: " + ", ".join([*ENDPOINT_SETTINGS,
                                                             "credentials_prefix"]))
        out[str(name)] = entry
    return out


def load_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables, overridden by the secrets file when one is named."""
    env = dict(os.environ if environ is None else environ)
    if settings.secrets_file is not None:
        env.update(read_secrets_file(settings.secrets_file))
    return env


def mask(value: str) -> str:
    return "(set, hidden)" if value else "(not set)"
