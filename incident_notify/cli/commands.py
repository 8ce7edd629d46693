"""Imports every command module so its commands register on the app."""

from incident_notify.cli import (  # noqa: F401
    audit_cmd,
    config_cmd,
    contacts_cmd,
    drill_cmd,
    incident_cmd,
    playbook_cmd,
    sandbox_cmd,
)
