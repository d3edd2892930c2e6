"""Stand-in for modules/prompt_parser.py: only `(text:weight)` attention and BREAK (enough for the tests)."""

from __future__ import annotations

import re

_ATTENTION = re.compile(r"\(([^():]+):([0-9.]+)\)|BREAK|[^(]+|\(")


def parse_prompt_attention(text):
    res = []
    for m in _ATTENTION.finditer(text):
        if m.group(1) is not None:
            res.append([m.group(1), float(m.group(2))])
        elif m.group(0) == "BREAK":
            res.append(["BREAK", -1])
        else:
            res.append([m.group(0), 1.0])
    return res or [["", 1.0]]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """The real one builds prompt schedules; without `[a:b:n]` syntax that is one conditioning per prompt."""
    return model.get_learned_conditioning(list(prompts))
