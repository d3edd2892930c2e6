"""Stand-in for modules/sd_samplers.py: the sampler names and the invalid-sampler fix-up process_images runs."""

from __future__ import annotations

from collections import namedtuple

SamplerData = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])

all_samplers = [SamplerData(name, None, [], {}) for name in ("DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC")]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
samplers_map = {x.name.lower(): x.name for x in all_samplers}


def fix_p_invalid_sampler_and_scheduler(p):
    if p.sampler_name not in all_samplers_map:
        p.sampler_name = all_samplers[0].name
    p.scheduler = p.scheduler or "Automatic"
