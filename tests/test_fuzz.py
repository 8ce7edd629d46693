"""A seeded mutator over the shipped playbooks and contact files. Whatever it produces, the
loaders answer with located problems (documented exit codes), never another exception,
within 2 s. A sample also goes through the real CLI: no exit 1, no traceback."""

from __future__ import annotations

import random
import resource
import shutil
import time
from pathlib import Path

import pytest

from incident_notify.errors import IncidentNotifyError
from tests.conftest import PLAYBOOKS, run_cli

SNIPPETS = [
    "&a", "*a", "<<: *a", "!!python/name:os.system", "!custom", "!!float x", "[", "]", "{",
    "}", ": ", "- ", "'", '"', "\t", "\x1b[2J", "[/x]", "{{", "}}", "{%", "%}",
    "{{ 'x' * 10**9 }}", "{% include 'x' %}", "\x00", "\ufeff", "\u202e", "null", "~",
    "true", "no", "1e999", "-1", "99999999999999999999", "max_length: 100000000",
    "pattern: '(a+)+b'", "sensitivity: internal", "type: twitter", "fallback: [x]",
    "api_base: http://evil", "\n  nested:\n    - 1", "#", "---\n", "...\n", "? x\n",
]


def mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True) or [""]
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        kind = rng.random()
        if kind < 0.3:
            pos = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:pos] + rng.choice(SNIPPETS) + lines[i][pos:]
        elif kind < 0.45:
            del lines[i]
            lines = lines or [""]
        elif kind < 0.6:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif kind < 0.75:
            lines[i] = lines[i][: rng.randint(0, len(lines[i]))] + "\n"
        elif kind < 0.85:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            data = bytearray(lines[i].encode("utf-8", "surrogatepass"))
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            lines[i] = data.decode("utf-8", "replace")
    return "".join(lines)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(PLAYBOOKS, root / "playbooks")
    shutil.copytree(PLAYBOOKS.parent / "templates", root / "templates")
    return root


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("seed", range(4))
def test_mutated_playbooks_and_contacts_give_located_problems_only(tree: Path,
                                                                   seed: int) -> None:
    from incident_notify.checks import check_playbook

    rng = random.Random(seed)
    sources = sorted((PLAYBOOKS).glob("*.yaml")) + sorted((PLAYBOOKS / "contacts").glob("*"))
    before = _peak_mib()
    for case in range(60):
        source = rng.choice(sources)
        relative = source.relative_to(PLAYBOOKS)
        target = tree / "playbooks" / relative
        original = source.read_text()
        target.write_text(mutate(original, rng), encoding="utf-8", errors="surrogatepass")
        playbook = target if target.suffix == ".yaml" and target.parent.name == "playbooks" \
            else tree / "playbooks" / "dc-power-failure.yaml"
        started = time.monotonic()
        try:
            check_playbook(playbook, check_contacts=True)
        except IncidentNotifyError:
            pass  # a documented error with its exit code
        finally:
            target.write_text(original)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"seed {seed} case {case} ({relative}) took {elapsed:.1f}s"
    assert _peak_mib() - before < 200


@pytest.mark.parametrize("seed", range(8))
def test_mutated_playbooks_through_the_cli_never_exit_1(tree: Path, seed: int) -> None:
    rng = random.Random(1000 + seed)
    source = rng.choice(sorted(PLAYBOOKS.glob("*.yaml")))
    target = tree / "playbooks" / f"fuzz-{seed}.yaml"
    target.write_text(mutate(source.read_text(), rng))
    try:
        for args in (["validate", str(target)], ["preview", str(target)]):
            proc = run_cli(*args, timeout=30)
            assert proc.returncode != 1, proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        target.unlink()
