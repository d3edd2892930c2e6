"""Stand-in for modules/extra_networks.py: `<name:arg1:arg2>` tags cut out of prompts (`parse_prompts`)."""

from __future__ import annotations

import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    found = defaultdict(list)

    def cut(match):
        found[match.group(1)].append(match.group(2).split(":"))
        return ""

    return re.sub(re_extra_net, cut, prompt), found


def parse_prompts(prompts):
    """Prompts without their tags, and the first prompt's tags by network name (lists of argument lists)."""
    result, data = [], None
    for prompt in prompts:
        cleaned, parsed = parse_prompt(prompt)
        data = parsed if data is None else data
        result.append(cleaned)
    return result, data or {}
