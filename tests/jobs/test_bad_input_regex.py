"""A REST server answering requests that carry a pathological filename word regex stays responsive: one with nested
quantifiers is refused with the request, and one that passes that check is stopped after a bounded time while the
status route keeps answering. Runs in a child process: a regex that never ends would freeze the whole interpreter
(the stdlib's engine holds the GIL), so only a time limit from outside can fail the test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import EXAMPLES, REPO

SCRIPT = textwrap.dedent("""
    import shutil, sys, threading, time
    from pathlib import Path
    from tests.conftest import rest_client
    root = Path(sys.argv[1])
    data = root / "data"
    data.mkdir()
    shutil.copy(sys.argv[2], data / ("a" * 44 + "!.png"))  # no .txt: the caption comes from the file name
    client, runner, _ = rest_client(root / "out")
    settings = {"data_dir": str(data), "width": 64, "height": 64}
    for route, body in (("lint", {"data_settings": {**settings, "filename_word_regex": "(a+)+$"}}),
                        ("train", {"method": "hypernetwork", "name": "h",
                                   "data_settings": {**settings, "filename_word_regex": "(a+)+$"}})):
        answer = client.post(f"/finetune/v1/{route}", json=body)
        assert answer.status_code == 400 and "repeats a group" in answer.json()["detail"], answer.text
    slow = {}
    def lint():
        slow["answer"] = client.post("/finetune/v1/lint", json={"data_settings": {
            **settings, "filename_word_regex": "(a|aa)+$"}})
    worker = threading.Thread(target=lint)
    worker.start()
    worst = 0.0
    while worker.is_alive():
        started = time.monotonic()
        assert client.get("/finetune/v1/status").status_code == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    assert slow["answer"].status_code == 400 and "took longer than" in slow["answer"].json()["detail"], slow
    print("status answered within", round(worst, 3), "s")
    assert worst < 1.0, worst
    print("OK")
""")


def test_rest_server_stays_responsive_under_a_pathological_regex(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(EXAMPLES / "ball-01.png")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the REST server stopped answering (killed after {exc.timeout} s)") from None
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
