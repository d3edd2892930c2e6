"""Stand-in for modules/shared_total_tqdm.py: the console's "Total progress" bar over all of a job's sampling steps.

As the real one: created on the first update with total = job_count * sampling_steps (so a generation that runs
while `job_count` holds something else counts against that), closed by `clear()`, which the WebUI's txt2img calls
after every generation. Records instead of printing.
"""

from __future__ import annotations

from modules import shared


class TotalTQDM:
    def __init__(self):
        self.total = None  # None: no bar open
        self.count = 0
        self.totals_seen = []

    def reset(self):
        self.total, self.count = shared.state.job_count * shared.state.sampling_steps, 0
        self.totals_seen.append(self.total)

    def update(self):
        if self.total is None:
            self.reset()
        self.count += 1

    def updateTotal(self, new_total):
        if self.total is None:
            self.reset()
        self.total = new_total

    def clear(self):
        self.total = None
