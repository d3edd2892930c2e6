"""Stand-in for modules/errors.py: `report` prints the message and the traceback to stderr, as the real one does.

Test aid: `reported` keeps every message.
"""

from __future__ import annotations

import sys
import traceback

reported: list[str] = []


def report(message, *, exc_info=False):
    reported.append(message)
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(traceback.format_exc(), file=sys.stderr)
