"""incident-notify: tell everyone, on every channel, and keep a record of every word."""

__version__ = "0.1.0"
