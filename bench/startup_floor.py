"""The least a `validate playbooks/` can cost with this project's libraries: a Typer app
with the same `--version` and one command taking paths, which imports what validating
needs (pydantic, yaml, jinja2's sandbox, phonenumbers, email-validator), reads each
playbook's YAML and compiles every template in it and under templates/, and does nothing
else: no schema, no checks, no rendering, no contacts. `bench/startup.py` times it beside
the tool, as a floor for issue 13's "validate within 2x --version".

    python bench/startup_floor.py --version | validate PATH...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False)


def _version(value: bool) -> None:
    if value:
        print("floor 0")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version,
                                               is_eager=True)] = False) -> None:
    """The floor app."""


@app.command()
def validate(paths: list[Path]) -> None:
    import email_validator
    import jinja2
    import phonenumbers
    import pydantic  # noqa: F401 - the playbook models' library
    import yaml
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)

    def compile_all(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                compile_all(value)
        elif isinstance(node, list):
            for value in node:
                compile_all(value)
        elif isinstance(node, str) and ("{{" in node or "{%" in node):
            env.from_string(node)

    for path in paths:
        for playbook in sorted(path.glob("*.yaml")):
            compile_all(yaml.safe_load(playbook.read_text()))
        for template in sorted((path.parent / "templates").rglob("*.j2")):
            env.from_string(template.read_text())
    phonenumbers.parse("+1 202 555 0101", "US")
    email_validator.validate_email("ann@example.org", check_deliverability=False)


@app.command()
def other(flag: bool = False) -> None:
    """(A second command, so that Typer keeps `validate` a subcommand as the tool does.)"""


if __name__ == "__main__":
    app()
