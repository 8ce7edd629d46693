"""Channels through the real tweepy / twilio / smtplib clients against the emulators."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incident_notify.channels import available_types, channel_class
from incident_notify.channels.base import (
    ChannelSpec,
    Delivery,
    NoAttempt,
    OutgoingMessage,
    PermanentChannelError,
    TransientChannelError,
)
from incident_notify.channels.email import EmailChannel
from incident_notify.channels.sms import SMSChannel
from incident_notify.channels.twitter import TwitterChannel
from incident_notify.channels.twitter_dm import TwitterDMChannel
from incident_notify.errors import ConfigError
from incident_notify.sandbox import SANDBOX_CREDENTIALS
from incident_notify.sandbox.smtp_server import SmtpEmulator
from incident_notify.sandbox.twitter_api import TwitterEmulator
from tests.conftest import PLAYBOOKS, json_doc, run_cli

CANARY = "CANARY-s3cr3t-7f1e"


def delivery(channel: str, recipient: str, text: str, key: str = "INC-1/1/x/p/1",
             **kw: Any) -> Delivery:
    return Delivery(key=key, incident_id="INC-1", update_no=1, channel=channel,
                    recipient=recipient, message=OutgoingMessage(text=text, **kw))


@pytest.fixture
def twitter() -> Iterator[TwitterEmulator]:
    emu = TwitterEmulator().start()
    yield emu
    emu.stop()


def twitter_secrets(emu: TwitterEmulator, **override: str) -> dict[str, str]:
    return {**SANDBOX_CREDENTIALS, "INCIDENT_NOTIFY_TWITTER_API_BASE": emu.url, **override}


def test_builtin_channels_are_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="incident_notify.channels")}
    assert {"twitter", "twitter_dm", "sms", "email"} <= names
    assert channel_class("sms") is SMSChannel
    assert set(available_types()) >= names


def test_unknown_channel_type_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        channel_class("pager")
    assert "twitter" in info.value.hint and "sms" in info.value.hint


# ------------------------------------------------------------------ twitter
def test_thread_lands_in_order_with_reply_ids(twitter: TwitterEmulator) -> None:
    ch = TwitterChannel(ChannelSpec("status", "twitter", "@acme_status"), twitter_secrets(twitter))
    reply_to = None
    for i in range(1, 4):
        receipt = ch.send(Delivery(key=f"k/{i}", incident_id="I", update_no=1, channel="status",
                                   recipient="", message=OutgoingMessage(text=f"part {i}/3"),
                                   part=i, parts=3, reply_to=reply_to), NoAttempt())
        reply_to = receipt.provider_id
    tweets = twitter.received.all()
    assert [t["text"] for t in tweets] == ["part 1/3", "part 2/3", "part 3/3"]
    assert tweets[0]["in_reply_to_tweet_id"] is None
    assert tweets[1]["in_reply_to_tweet_id"] == tweets[0]["id"]
    assert tweets[2]["in_reply_to_tweet_id"] == tweets[1]["id"]


def test_tweet_answered_a_byte_at_a_time_is_unknown_within_its_deadline(
        twitter: TwitterEmulator) -> None:
    """Every byte of the answer comes within the 1 s socket timeout, so only the deadline
    on the whole request (3 s) ends it: the tweet was taken, so it is unknown (may have
    been posted), never a plain failure; the next request on the channel works."""
    import time

    from incident_notify.channels.base import TransientChannelError

    ch = TwitterChannel(ChannelSpec("status", "twitter", "@acme_status",
                                    options={"timeout_s": 1}), twitter_secrets(twitter))
    twitter.faults.update(dribble_ms=300)
    started = time.monotonic()
    with pytest.raises(TransientChannelError) as info:
        ch.send(Delivery(key="k/1", incident_id="I", update_no=1, channel="status",
                         recipient="", message=OutgoingMessage(text="slow answer")),
                NoAttempt())
    assert time.monotonic() - started < 6
    assert info.value.code == "timeout" and info.value.maybe_delivered
    assert "within 3s" in info.value.message
    assert [t["text"] for t in twitter.received.all()] == ["slow answer"]
    twitter.faults.update(dribble_ms=0)
    ch.send(Delivery(key="k/2", incident_id="I", update_no=1, channel="status", recipient="",
                     message=OutgoingMessage(text="next")), NoAttempt())
    assert len(twitter.received.all()) == 2


def test_the_deadline_adapter_keeps_tls_verification_and_bounds_a_tls_answer(
        tmp_path: Path) -> None:
    """The HTTP channels' sessions go through the deadline's adapter (its own connection
    classes): over TLS it must still verify the certificate against the CA the
    environment names, refuse an unknown one, and cut an answer dribbled over TLS."""
    import http.server
    import ssl
    import threading
    import time

    import requests

    from incident_notify.channels._deadline import Deadline, mount
    from incident_notify.channels._http import read_environment_once
    from incident_notify.sandbox.smtp_server import make_self_signed

    cert, key = make_self_signed(tmp_path)
    body = b'{"sid": "SM1"}'

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            slow = self.path == "/slow"
            for i in range(len(head + body)):
                self.wfile.write((head + body)[i:i + 1])
                self.wfile.flush()
                if slow:
                    time.sleep(0.3)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("REQUESTS_CA_BUNDLE", str(cert))
            trusted = requests.Session()
            read_environment_once(trusted, base)
            mount(trusted)
        assert trusted.get(f"{base}/fast", timeout=5).json() == {"sid": "SM1"}
        pool = trusted.get_adapter(base).poolmanager.connection_from_url(base)
        assert pool.ConnectionCls.__name__ == "WatchedHTTPS"
        started = time.monotonic()
        with pytest.raises(requests.exceptions.RequestException), Deadline(1.0):
            trusted.get(f"{base}/slow", timeout=5)
        assert time.monotonic() - started < 3
        stranger = requests.Session()
        mount(stranger)
        with pytest.raises(requests.exceptions.SSLError):
            stranger.get(f"{base}/fast", timeout=5)
        # The SMS channel's client sends through its session's adapter, not the session:
        # the same verification and deadline hold.
        from incident_notify.channels._twilio_http import make_http

        with pytest.MonkeyPatch.context() as env:
            env.setenv("REQUESTS_CA_BUNDLE", str(cert))
            twilio_http = make_http(base, 5, logging.getLogger())
        assert twilio_http.request("GET", f"{base}/fast").text == body.decode()
        started = time.monotonic()
        with pytest.raises(requests.exceptions.RequestException), Deadline(1.0):
            twilio_http.request("GET", f"{base}/slow")
        assert time.monotonic() - started < 3
        with pytest.MonkeyPatch.context() as env:
            for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
                env.delenv(name, raising=False)
            untrusting = make_http(base, 5, logging.getLogger())
        with pytest.raises(requests.exceptions.SSLError):
            untrusting.request("GET", f"{base}/fast")
    finally:
        server.shutdown()


def test_dm_reaches_the_resolved_user_id_and_lookup_is_cached(twitter: TwitterEmulator) -> None:
    uid = twitter.add_user("carol_ops")
    ch = TwitterDMChannel(ChannelSpec("dm", "twitter_dm", "@acme_status"),
                          twitter_secrets(twitter))
    ch.send(delivery("dm", "@carol_ops", "first"), NoAttempt())
    ch.send(delivery("dm", "@Carol_Ops", "second", key="k2"), NoAttempt())
    dms = twitter.received.all()
    assert [d["participant_id"] for d in dms] == [uid, uid]
    assert twitter.lookups == 1


def test_dm_to_unknown_user_is_a_permanent_recipient_error(twitter: TwitterEmulator) -> None:
    ch = TwitterDMChannel(ChannelSpec("dm", "twitter_dm"), twitter_secrets(twitter))
    with pytest.raises(PermanentChannelError) as info:
        ch.send(delivery("dm", "@nobody_here", "x"), NoAttempt())
    assert info.value.recipient_problem


def test_wrong_twitter_secret_gets_401_from_the_signature_check(twitter: TwitterEmulator) -> None:
    ch = TwitterChannel(ChannelSpec("status", "twitter"),
                        twitter_secrets(twitter, TWITTER_API_SECRET=CANARY))
    with pytest.raises(PermanentChannelError) as info:
        ch.send(delivery("status", "", "hello"), NoAttempt())
    assert info.value.code == "auth"
    assert "signature" in info.value.message
    assert CANARY not in str(info.value) + repr(info.value) + info.value.hint
    assert not twitter.received.all()


def test_twitter_outage_is_transient(twitter: TwitterEmulator) -> None:
    twitter.faults.update(outage=True)
    ch = TwitterChannel(ChannelSpec("status", "twitter"), twitter_secrets(twitter))
    with pytest.raises(TransientChannelError):
        ch.send(delivery("status", "", "hello"), NoAttempt())
    assert not ch.check().ok


def test_twitter_429_carries_the_reset(twitter: TwitterEmulator) -> None:
    twitter.faults.update(rate_limit=1, rate_window_s=60)
    ch = TwitterChannel(ChannelSpec("status", "twitter"), twitter_secrets(twitter))
    ch.send(delivery("status", "", "one"), NoAttempt())
    with pytest.raises(TransientChannelError) as info:
        ch.send(delivery("status", "", "two"), NoAttempt())
    assert info.value.retry_after is not None and 50 <= info.value.retry_after <= 61


def test_duplicate_tweet_is_reported_not_retried(twitter: TwitterEmulator) -> None:
    ch = TwitterChannel(ChannelSpec("status", "twitter"), twitter_secrets(twitter))
    ch.send(delivery("status", "", "same words"), NoAttempt())
    with pytest.raises(PermanentChannelError) as info:
        ch.send(delivery("status", "", "same words"), NoAttempt())
    assert info.value.code == "duplicate"


def test_overlong_raw_tweet_is_refused_by_the_emulator(twitter: TwitterEmulator) -> None:
    ch = TwitterChannel(ChannelSpec("status", "twitter"), twitter_secrets(twitter))
    with pytest.raises(PermanentChannelError) as info:
        ch.send(delivery("status", "", "x" * 281), NoAttempt())
    assert info.value.code == "400"


# ------------------------------------------------------------------ sms
def sms_channel(sandbox: Any, **override: str) -> SMSChannel:
    return SMSChannel(ChannelSpec("sms", "sms", "+15005550006"), {**sandbox.env(), **override})


def test_sms_receipt_has_sid_and_segments(sandbox: Any) -> None:
    receipt = sms_channel(sandbox).send(delivery("sms", "+12025550101", "x" * 200), NoAttempt())
    assert receipt.provider_id.startswith("SM") and receipt.segments == 2
    assert sandbox.twilio.received.all()[0]["to"] == "+12025550101"


def test_sms_invalid_number_is_permanent_21211(sandbox: Any) -> None:
    with pytest.raises(PermanentChannelError) as info:
        sms_channel(sandbox).send(delivery("sms", "+1202", "x"), NoAttempt())
    assert info.value.code == "21211" and info.value.recipient_problem


def test_sms_stop_is_an_opt_out(sandbox: Any) -> None:
    sandbox.twilio.add_stop("+12025550199")
    with pytest.raises(PermanentChannelError) as info:
        sms_channel(sandbox).send(delivery("sms", "+12025550199", "x"), NoAttempt())
    assert info.value.opt_out and info.value.code == "21610"


def test_sms_outage_is_transient_and_wrong_token_is_auth(sandbox: Any) -> None:
    sandbox.twilio.faults.update(outage=True)
    with pytest.raises(TransientChannelError):
        sms_channel(sandbox).send(delivery("sms", "+12025550101", "x"), NoAttempt())
    sandbox.twilio.faults.update(outage=False)
    with pytest.raises(PermanentChannelError) as info:
        sms_channel(sandbox, TWILIO_AUTH_TOKEN=CANARY).send(
            delivery("sms", "+12025550101", "x"), NoAttempt())
    assert info.value.code == "auth"
    assert CANARY not in str(info.value) + repr(info.value)


def test_sms_messaging_service_and_status_callback(sandbox: Any) -> None:
    service = next(iter(sandbox.twilio.messaging_service_sids))
    ch = SMSChannel(ChannelSpec("sms", "sms", "", options={
        "messaging_service_sid": service, "status_callback": "https://hooks.example.com/s"}),
        sandbox.env())
    ch.send(delivery("sms", "+12025550101", "x"), NoAttempt())
    rec = sandbox.twilio.received.all()[0]
    assert rec["messaging_service_sid"] == service
    assert rec["status_callback"] == "https://hooks.example.com/s"


# ------------------------------------------------------------------ email
def email_channel(sandbox: Any, **override: str) -> EmailChannel:
    return EmailChannel(ChannelSpec("mail", "email", "Acme Status <status@acme.example>"),
                        {**sandbox.env(), **override})


def test_email_multipart_with_threading_headers(sandbox: Any) -> None:
    ch = email_channel(sandbox)
    first = ch.send(delivery("mail", "carol@example.org", "first text", key="INC-1/1/m/c/1",
                             subject="[Investigating] Power", html="<p>first</p>"), NoAttempt())
    ch.send(Delivery(key="INC-1/2/m/c/1", incident_id="INC-1", update_no=2, channel="mail",
                     recipient="carol@example.org",
                     message=OutgoingMessage("second", "[Identified] Power", "<p>2</p>"),
                     reply_to=first.provider_id, thread_refs=(first.provider_id,)), NoAttempt())
    one, two = sandbox.smtp.received.all()
    assert one["is_multipart"] and {"text/plain", "text/html"} <= set(one["parts"])
    assert one["subject"] == "[Investigating] Power" and one["date"]
    assert one["message_id"] == first.provider_id
    assert two["in_reply_to"] == first.provider_id
    assert first.provider_id in (two["references"] or "")
    ch.close()


def test_email_reuses_one_connection(sandbox: Any) -> None:
    ch = email_channel(sandbox)
    before = sandbox.smtp.connections
    for i in range(20):
        ch.send(delivery("mail", f"p{i}@example.org", "x", key=f"k{i}", subject="s"), NoAttempt())
    ch.close()
    assert sandbox.smtp.connections - before == 1


def test_email_bad_recipient_wrong_password_outage(sandbox: Any) -> None:
    sandbox.smtp.faults.update(bad_recipients=["gone@example.org"])
    with pytest.raises(PermanentChannelError) as info:
        email_channel(sandbox).send(delivery("mail", "gone@example.org", "x", subject="s"),
                                    NoAttempt())
    assert info.value.recipient_problem
    with pytest.raises(PermanentChannelError) as info:
        email_channel(sandbox, SMTP_PASSWORD=CANARY).send(
            delivery("mail", "a@example.org", "x", subject="s"), NoAttempt())
    assert info.value.code == "auth" and CANARY not in str(info.value)
    sandbox.smtp.faults.update(outage=True)
    with pytest.raises(TransientChannelError):
        email_channel(sandbox).send(delivery("mail", "a@example.org", "x", subject="s"),
                                    NoAttempt())


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_email_over_tls_with_a_private_ca(tls: str) -> None:
    with SmtpEmulator(tls=tls) as emu:  # type: ignore[arg-type]
        scheme = "smtps" if tls == "implicit" else "smtp+starttls"
        ch = EmailChannel(ChannelSpec("mail", "email", "ops@acme.example"), {
            "SMTP_USERNAME": emu.username, "SMTP_PASSWORD": emu.password,
            "INCIDENT_NOTIFY_SMTP_URL": f"{scheme}://localhost:{emu.port}",
            "INCIDENT_NOTIFY_SMTP_CAFILE": str(emu.cafile)})
        assert ch.check().ok
        ch.send(delivery("mail", "a@example.org", "over TLS", subject="tls"), NoAttempt())
        ch.close()
        assert emu.received.all()[0]["subject"] == "tls"


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_the_smtp_emulator_leaves_nothing_in_the_temporary_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: str) -> None:
    """Every start of the SMTP emulator (each sandbox, each drill, each test) made a folder
    in /tmp and never removed it, with a TLS private key in it when TLS was on: tens of
    thousands of them on a machine that runs the suite."""
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with SmtpEmulator(tls=tls) as emu:  # type: ignore[arg-type]
        assert (emu.cafile is not None) == (tls != "none")
        assert emu.cafile is None or Path(emu.cafile).exists()
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize("unknown", [["EHLO"], ["EHLO", "NOOP", "RSET"]])
def test_a_mail_server_that_speaks_only_helo_is_sent_to(unknown: list[str]) -> None:
    """An old or minimal relay answers EHLO "502 Command not implemented". The channel
    took that for a refusal: email was down, where RFC 5321 (and smtplib's own sending)
    falls back to HELO. The health check's NOOP answered so took email down too. A relay
    that needs no login is sent to; with a login configured, the missing AUTH is said, as
    for any server that offers none."""
    with SmtpEmulator(require_auth=False) as emu:
        emu.faults.update(unknown_commands=unknown, bad_recipients=["gone@example.org"])
        url = {"INCIDENT_NOTIFY_SMTP_URL": f"smtp://localhost:{emu.port}"}
        ch = EmailChannel(ChannelSpec("mail", "email", "ops@acme.example"), url)
        health = ch.check()
        assert health.ok, health
        assert health.detail.startswith("HELO ok")
        emu.faults.update(unknown_commands=[])
        assert ch.check().detail.startswith("EHLO ok")  # (and a server that knows EHLO)
        emu.faults.update(unknown_commands=unknown)
        ch.send(delivery("mail", "a@example.org", "over HELO", subject="helo"), NoAttempt())
        with pytest.raises(PermanentChannelError):  # (then RSET, 502 if unknown)
            ch.send(delivery("mail", "gone@example.org", "x", subject="gone"), NoAttempt())
        ch.send(delivery("mail", "c@example.org", "after a refusal", subject="again"),
                NoAttempt())
        ch.close()
        assert [m["subject"] for m in emu.received.all()] == ["helo", "again"]
        with pytest.raises(PermanentChannelError, match="does not offer"):
            EmailChannel(ChannelSpec("mail", "email", "ops@acme.example"), {
                **url, "SMTP_USERNAME": emu.username, "SMTP_PASSWORD": emu.password,
            }).send(delivery("mail", "b@example.org", "x", subject="s"), NoAttempt())


def test_plaintext_smtp_to_a_remote_host_is_refused() -> None:
    with pytest.raises(ConfigError):
        EmailChannel(ChannelSpec("mail", "email", "ops@acme.example"),
                     {"INCIDENT_NOTIFY_SMTP_URL": "smtp://mail.example.com:25"})


@pytest.mark.parametrize("options", [{"host": "mail.example.com"}, {"api_base": "http://x"},
                                     {"tls": "none"}, {"cafile": "/tmp/ca.pem"}])
def test_a_playbook_cannot_name_an_endpoint(options: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="operator's configuration"):
        EmailChannel(ChannelSpec("mail", "email", "ops@acme.example", options=options),
                     {"INCIDENT_NOTIFY_SMTP_URL": "smtp://127.0.0.1:25"})


@pytest.mark.parametrize("url", ["http://api.example.com", "ftp://127.0.0.1",
                                 "http://10.0.0.1:8080"])
def test_an_http_endpoint_must_be_https_unless_local(url: str) -> None:
    ch = SMSChannel(ChannelSpec("sms", "sms", "+15005550006"),
                    {"INCIDENT_NOTIFY_TWILIO_API_BASE": url})
    with pytest.raises(ConfigError, match="https"):
        ch.endpoint()


# ------------------------------------------------------------------ secrets, check
def test_a_provider_quoting_a_credential_in_its_refusal_is_not_repeated(
        sandbox: Any) -> None:
    """Relays name the login in a refusal ("not owned by user ..."), Twilio quotes the
    account's path in a 404: the error the tool records and prints hides those values."""
    login = "canary-login-7f3a"
    sandbox.smtp.username = login
    sandbox.smtp.faults.update(bad_senders=["status@acme.example"])
    ch = email_channel(sandbox, SMTP_USERNAME=login)
    with pytest.raises(PermanentChannelError) as info:
        ch.send(delivery("mail", "a@example.org", "x", subject="s"), NoAttempt())
    ch.close()
    said = f"{info.value} {info.value.hint}"
    assert "553" in said and "(hidden)" in said and login not in said


def test_canary_secret_never_appears_in_output_or_logs(sandbox: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {**sandbox.env(), "TWITTER_ACCESS_TOKEN_SECRET": CANARY,
               "TWILIO_AUTH_TOKEN": CANARY, "SMTP_PASSWORD": CANARY}
    texts = []
    for cls, rcpt, kw in ((TwitterChannel, "", {}), (SMSChannel, "+12025550101", {}),
                          (EmailChannel, "a@example.org", {"subject": "s"})):
        ch = cls(ChannelSpec("c", cls.type_name, "status@acme.example"
                             if cls is EmailChannel else "+15005550006"), secrets)
        texts.append(ch.check().detail)
        with pytest.raises(PermanentChannelError) as info:
            ch.send(delivery("c", rcpt, "x", **kw), NoAttempt())
        texts += [str(info.value), repr(info.value), info.value.hint]
    texts.append(caplog.text)
    assert CANARY not in "\n".join(texts)
    # And through the CLI: a secrets file with canaries, every command's output.
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text("".join(f"{k}={CANARY}\n" for k in SANDBOX_CREDENTIALS))
    secrets_file.chmod(0o600)
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "a.jsonl")}
    outputs = [run_cli("channels", "check", str(PLAYBOOKS / "dc-power-failure.yaml"),
                       "--secrets", str(secrets_file), env=env),
               run_cli("config", "show", env={**env, "INCIDENT_NOTIFY_SECRETS_FILE":
                                               str(secrets_file)})]
    for proc in outputs:
        assert CANARY not in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
    assert "(set, hidden)" in outputs[1].stdout


def test_channels_check_sandbox_healthy_then_twitter_down(sandbox: Any) -> None:
    sandbox.write_state()
    pb = str(PLAYBOOKS / "dc-power-failure.yaml")
    doc = json_doc(run_cli("channels", "check", pb, "--sandbox", "--json"))
    assert doc["exit_code"] == 0
    assert all(row["ok"] for row in doc["data"]["channels"])
    sandbox.twitter.faults.update(outage=True)
    proc = run_cli("channels", "check", pb, "--sandbox")
    assert proc.returncode == 7
    lines = [line for line in proc.stdout.splitlines() if "status_twitter" in line]
    assert lines and "DOWN" in lines[0]
    assert all("healthy" in line for line in proc.stdout.splitlines() if "customer_sms" in line)


@pytest.mark.parametrize("sender", ["Öps <ops@acme.example>", "ops@acme.example",
                                    "Acme Status Desk <status@acme.example>"])
def test_recipient_headers_written_directly_are_the_ones_build_folds(
        monkeypatch: pytest.MonkeyPatch, sender: str) -> None:
    """The per-recipient header fast path gives byte for byte the message `build` and the
    email generator give, for plain and awkward recipients, subjects and threads (the
    awkward ones go through `build`); only the MIME boundary is random."""
    import re as re_
    from datetime import UTC, datetime

    from incident_notify.channels import email as email_module
    from incident_notify.channels.base import ChannelSpec, Delivery, OutgoingMessage

    monkeypatch.setattr(email_module, "time_now",
                        lambda: datetime(2026, 11, 26, 9, 5, 7, tzinfo=UTC))
    for options in ({}, {"reply_to": "desk@acme.example",
                         "list_unsubscribe": "mailto:unsub@acme.example"}):
        spec = ChannelSpec(name="e", type="email", sender=sender, options=options)
        ch = email_module.EmailChannel(spec, {"INCIDENT_NOTIFY_SMTP_URL": "smtp://127.0.0.1:25"})
        recipients = ["a@b.example", "first.last+tag@sub.example.org", "ü@b.example",
                      "x" * 70 + "@b.example", '"quoted name"@b.example', "a..b@b.example",
                      "o'brien@b.example", "UPPER@B.EXAMPLE", ".lead@b.example"]
        subjects = [None, "Power loss at LON-2", "Sübject " * 12, "line\nbreak " + "x" * 90]
        threads = [(None, ()),
                   ("<r@acme.example>", ("<a@acme.example>", "<b@acme.example>") * 4)]
        fast = 0
        for i, (recipient, subject, (reply_to, refs)) in enumerate(
                (r, sub, t) for r in recipients for sub in subjects for t in threads):
            d = Delivery(key=f"k{i}", incident_id="INC-20261126-001", update_no=1,
                         channel="e", recipient=recipient,
                         message=OutgoingMessage(text="Hello\nline 2", subject=subject,
                                                 html="<p>hi</p>" if i % 2 else None),
                         reply_to=reply_to, thread_refs=refs)
            fast += ch._recipient_headers(d) is not None
            shared, shared_options = ch.flatten(d)
            whole, whole_options = email_module._flatten(ch.build(d), ch.from_addr, recipient)

            def plain(m: bytes) -> bytes:
                return re_.sub(rb'==+[0-9]+==', b"BOUNDARY", m)

            assert plain(shared) == plain(whole), (recipient, subject, reply_to)
            assert shared_options == whole_options
        assert fast >= len(subjects) * len(threads) * 4  # the plain recipients went fast


def test_an_email_built_from_the_shared_body_is_the_whole_message() -> None:
    """Each recipient's headers joined to a body flattened once per text: the same
    message, header for header and part for part, as flattening the whole message."""
    from email import message_from_bytes, policy

    from incident_notify.channels.base import ChannelSpec, Delivery, OutgoingMessage
    from incident_notify.channels.email import EmailChannel, _flatten

    spec = ChannelSpec(name="e", type="email", sender="Öps <ops@acme.example>",
                       options={"reply_to": "desk@acme.example"})
    ch = EmailChannel(spec, {"INCIDENT_NOTIFY_SMTP_URL": "smtp://127.0.0.1:25"})
    for recipient, html in (("a@b.example", "<p>hi</p>"), ("ü@b.example", None)):
        d = Delivery(key=f"k-{recipient}", incident_id="INC-1", update_no=1, channel="e",
                     recipient=recipient, message=OutgoingMessage(
                         text="Hello ünïcode\nline 2 " + "x" * 200, subject="Sübject " * 12,
                         html=html), reply_to="<x@y>", thread_refs=("<w@y>",))
        shared, options = ch.flatten(d)
        whole, whole_options = _flatten(ch.build(d), ch.from_addr, recipient)
        assert options == whole_options
        a, b = (message_from_bytes(m, policy=policy.default) for m in (shared, whole))
        assert sorted(a.keys()) == sorted(b.keys())
        for name in set(a.keys()) - {"Date", "Content-Type"}:
            assert str(a[name]) == str(b[name]), name
        assert a.get_content_type() == b.get_content_type()
        parts = [(p.get_content_type(), p.get_content()) for p in a.walk()
                 if not p.is_multipart()]
        assert parts == [(p.get_content_type(), p.get_content()) for p in b.walk()
                         if not p.is_multipart()]
        # The body is shared, not rebuilt: a second recipient of the text reuses it.
        assert ch._bodies[(d.message.text, html)] in shared


# ------------------------------------------------------------------ proxies
class LocalHTTP:
    """A threaded HTTP server on this machine for one handler class, stopped by `stop`."""

    def _serve(self, handler: type) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ForwardProxy(LocalHTTP):
    """A plain HTTP forward proxy that relays each request to the URL in its request line
    and remembers which URLs went through it."""

    def __init__(self) -> None:
        import http.client
        import urllib.parse
        from http.server import BaseHTTPRequestHandler

        seen = self.seen = []  # type: list[str]

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                seen.append(self.path)
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("proxy-connection", "connection")}
                upstream.request(self.command, url.path + (f"?{url.query}" if url.query
                                                           else ""), body, headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_DELETE = _relay

            def log_message(self, *args: Any) -> None:
                pass

        self._serve(Relay)


@pytest.mark.parametrize("bypassed", [False, True])
def test_sms_and_tweets_go_through_the_proxy_the_environment_names(
        sandbox: Any, twitter: TwitterEmulator, monkeypatch: pytest.MonkeyPatch,
        bypassed: bool) -> None:
    """The HTTP clients read the environment once per client instead of per request: the
    proxy it names is still used for every request, and NO_PROXY still bypasses it."""
    import os

    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    proxy = ForwardProxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        if bypassed:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        sms = sms_channel(sandbox)
        for n in range(2):
            sms.send(delivery("sms", f"+1202555010{n}", "Power restored."), NoAttempt())
        tweets = TwitterChannel(ChannelSpec("status", "twitter"), twitter_secrets(twitter))
        tweets.send(delivery("status", "", "Power restored."), NoAttempt())
    finally:
        proxy.stop()
    assert len(sandbox.twilio.received.all()) == 2 and len(twitter.received.all()) == 1
    through = [url for url in proxy.seen if "/Messages.json" in url or "/2/tweets" in url]
    assert len(through) == (0 if bypassed else 3), proxy.seen


class Recorder(LocalHTTP):
    """An HTTP server that records each request as it came (line, headers, body) and
    answers `{}`: what a client put on the wire, compared byte for byte."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler

        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        seen = self.seen

        class Record(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append((self.requestline, {k.lower(): v for k, v in self.headers.items()},
                             body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_DELETE = _record

            def log_message(self, *args: Any) -> None:
                pass

        self._serve(Record)


def test_the_twilio_client_puts_on_the_wire_what_the_librarys_own_http_client_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SMS channel's HTTP client (`_twilio_http`) skips `requests.Session`'s
    per-request work; what it sends must be byte for byte what twilio's own
    `TwilioHttpClient` sends through the session: form fields (repeated, left out when
    None, UTF-8, numbers), query parameters, Basic credentials, every header."""
    import os

    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    from incident_notify.channels._twilio_http import make_http

    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    server = Recorder()
    sid, token = "AC" + "0" * 32, "token-ü"
    path = f"{server.url}/2010-04-01/Accounts/{sid}/Messages.json"
    fields = {"To": "+12025550100", "From": "+15005550006", "Body": "Stromausfall: Zürich 🔌 & co",
              "MediaUrl": ["https://a.example/1", "https://a.example/2?x=1&y=2"],
              "Attempt": 3, "ValidityPeriod": None, "SmartEncoded": True}
    try:
        for http in (TwilioHttpClient(timeout=5), make_http(server.url, 5, logging.getLogger())):
            client = Client(sid, "ignored", http_client=http)
            client.request("POST", path, data=fields, auth=(sid, token))
            client.request("GET", path, params={"To": "+12025550100", "PageSize": 50,
                                                "From": None})
            client.request("POST", path, data={})
            client.request("DELETE", path + "?x=1", params={"y": "é"})
            client.request("POST", path, data={"a": [1, 2]},
                           headers={"Content-Type": "application/json"})
    finally:
        server.stop()
    theirs, ours = server.seen[:5], server.seen[5:]
    assert len(ours) == 5
    for mine, library in zip(ours, theirs, strict=True):
        assert mine == library
    assert theirs[0][2].startswith(b"To=%2B12025550100&From=") and b"MediaUrl=" in theirs[0][2]
