"""`preview`: the exact messages of one stage, per audience and channel, with counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incident_notify.errors import PlaybookError, Problem
from incident_notify.messages import (
    IncidentContext,
    RenderedMessage,
    collect_variables,
    compose,
    describe_measure,
    make_renderer,
)
from incident_notify.playbook import Playbook, load_playbook, message_targets


@dataclass
class PreviewResult:
    playbook: str
    stage: str
    messages: list[RenderedMessage] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [p for m in self.messages for p in m.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "stage": self.stage,
            "messages": [message_to_dict(m) for m in self.messages],
        }


def message_to_dict(m: RenderedMessage) -> dict[str, Any]:
    return {
        "audience": m.audience,
        "channel": m.channel,
        "channel_type": m.channel_type,
        "fallback_from": m.fallback_from,
        "subject": m.subject,
        "parts": [
            {"n": i + 1, "text": text, "length": meas.value, "limit": meas.limit,
             "unit": meas.unit, "detail": meas.detail, "ok": meas.ok}
            for i, (text, meas) in enumerate(zip(m.parts, m.measures, strict=False))
        ],
        "html": m.html,
        "ok": m.ok,
        "summary": describe_measure(max(m.measures, key=lambda x: x.value)),
    }


def check_stage(pb: Playbook, stage: str | None) -> str:
    return pb.stage_named(stage)


def preview_stage(
    path: Path, stage: str | None, sets: list[str], vars_file: Path | None, *,
    message: str = "", include_fallbacks: bool = False,
) -> PreviewResult:
    pb = load_playbook(path)
    name = check_stage(pb, stage)
    values = collect_variables(pb, sets, vars_file)
    renderer = make_renderer(pb)
    from incident_notify.sensitivity import leak_problems

    leaks = leak_problems(pb, renderer, name)
    if leaks:  # the same refusal a send's preflight gives
        raise PlaybookError(leaks, hint="nothing can be sent this way; incident-notify "
                            "validate shows every path")
    ctx = IncidentContext(id="INC-PREVIEW", stage=name, message=message)
    result = PreviewResult(playbook=str(path), stage=name)
    for audience, channel, origin in message_targets(pb, name):
        if origin is not None and not include_fallbacks:
            continue
        result.messages.append(
            compose(pb, renderer, name, channel, audience, values, ctx, fallback_from=origin,
                    carry_message=bool(message.strip())))
    return result
