"""Local emulators of Twitter API v2, Twilio REST and SMTP, for tests and rehearsals.

`Sandbox` starts all three on 127.0.0.1 and gives the environment that points the real
tweepy / twilio / smtplib clients at them (`env()`); no real credentials are involved.
`incident-notify sandbox` runs one in the foreground and records its environment in the
user state directory, so that `--sandbox` on other commands attaches to it (and the tweet
thread of an incident survives between commands); otherwise `--sandbox` starts a private
one in-process for the duration of the command.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

# Fixed sandbox credentials: they only open the local emulators.
SANDBOX_CREDENTIALS = {
    "TWITTER_API_KEY": "sandbox-key",
    "TWITTER_API_SECRET": "sandbox-secret",
    "TWITTER_ACCESS_TOKEN": "sandbox-token",
    "TWITTER_ACCESS_TOKEN_SECRET": "sandbox-token-secret",
    "TWILIO_ACCOUNT_SID": "AC" + "5a4db0c" * 4 + "5a4d",
    "TWILIO_AUTH_TOKEN": "sandbox-auth-token",
    "SMTP_USERNAME": "sandbox",
    "SMTP_PASSWORD": "sandbox-password",
}


def state_file() -> Path:
    from incident_notify.config import state_dir

    return state_dir() / "sandbox.json"


class Sandbox:
    """The three emulators, started together."""

    def __init__(self, *, twitter_port: int = 0, twilio_port: int = 0,
                 smtp_port: int = 0) -> None:
        from incident_notify.sandbox.smtp_server import SmtpEmulator
        from incident_notify.sandbox.twilio_api import TwilioEmulator
        from incident_notify.sandbox.twitter_api import TwitterEmulator

        c = SANDBOX_CREDENTIALS
        self.twitter = TwitterEmulator(
            twitter_port, consumer_key=c["TWITTER_API_KEY"],
            consumer_secret=c["TWITTER_API_SECRET"], access_token=c["TWITTER_ACCESS_TOKEN"],
            access_token_secret=c["TWITTER_ACCESS_TOKEN_SECRET"], auto_users=True)
        self.twilio = TwilioEmulator(twilio_port, account_sid=c["TWILIO_ACCOUNT_SID"],
                                     auth_token=c["TWILIO_AUTH_TOKEN"])
        self.smtp = SmtpEmulator(smtp_port, username=c["SMTP_USERNAME"],
                                 password=c["SMTP_PASSWORD"], tls="none")
        import secrets

        self.token = secrets.token_urlsafe(24)
        """Per-run token of the control APIs (kept in the owner-only state file)."""
        for emu in (self.twitter, self.twilio):
            emu.control_token = self.token
        self.remote = False

    @property
    def emulators(self) -> dict[str, Any]:
        return {"twitter": self.twitter, "twilio": self.twilio, "smtp": self.smtp}

    def start(self) -> Sandbox:
        for emu in self.emulators.values():
            emu.start()
        return self

    def stop(self) -> None:
        for emu in self.emulators.values():
            try:
                emu.stop()
            except Exception:
                pass

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Variables that point the real clients at these emulators."""
        return {
            **SANDBOX_CREDENTIALS,
            "INCIDENT_NOTIFY_TWITTER_API_BASE": self.twitter.url,
            "INCIDENT_NOTIFY_TWILIO_API_BASE": self.twilio.url,
            "INCIDENT_NOTIFY_SMTP_URL": f"smtp://127.0.0.1:{self.smtp.port}",
            "INCIDENT_NOTIFY_SANDBOX_TOKEN": self.token,
        }

    def remember_tweets(self, tweet_ids: Any) -> None:
        """Accept replies to tweets an earlier command posted to an earlier sandbox."""
        for tweet_id in tweet_ids:
            self.twitter.known_tweet(str(tweet_id))

    def received(self) -> dict[str, list[dict[str, Any]]]:
        return {name: emu.received.all() for name, emu in self.emulators.items()}

    def reset(self) -> None:
        for emu in self.emulators.values():
            emu.reset()

    # ---------------------------------------------------------------- attach
    def write_state(self, path: Path | None = None, *, control_url: str | None = None) -> Path:
        """Tell other processes (`--sandbox`, `sandbox fault`) where this sandbox runs, and
        its control API when one serves it."""
        target = path or state_file()
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = self.env()
        if control_url is not None:
            env["INCIDENT_NOTIFY_SANDBOX_CONTROL"] = control_url
        # Owner-only from the start (it holds the control token), and whole: written
        # beside it, then renamed over it, so a reader never sees half of it.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"pid": os.getpid(), "env": env}))
        os.replace(tmp, target)
        return target

    @staticmethod
    def attach_or_start() -> Sandbox | RemoteSandbox:
        remote = RemoteSandbox.find()
        return remote if remote is not None else Sandbox().start()


class RemoteSandbox:
    """A sandbox running in another process (`incident-notify sandbox`)."""

    remote = True

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env

    @classmethod
    def find(cls, path: Path | None = None) -> RemoteSandbox | None:
        target = path or state_file()
        try:
            data = json.loads(target.read_text())
            os.kill(int(data["pid"]), 0)
            url = data["env"]["INCIDENT_NOTIFY_TWITTER_API_BASE"] + "/_sandbox/faults"
            token = data["env"].get("INCIDENT_NOTIFY_SANDBOX_TOKEN", "")
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=2):
                pass
        except (OSError, ValueError, KeyError):
            return None
        return cls(data["env"])

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def stop(self) -> None:
        """Nothing to stop: the sandbox belongs to its own process."""

    def remember_tweets(self, tweet_ids: Any) -> None:
        """A running sandbox already knows every tweet it accepted."""
