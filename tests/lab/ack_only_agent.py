"""A stand-in agent for testing the lab's apply plumbing: it acknowledges, it enforces NOTHING.

It takes the real agent's arguments, watches --rules-file and writes a NodeRuleSetStatus with
observedGeneration = the file's metadata.generation to --status-file. `--mode never` reads but
never acknowledges (to test apply's timeout); `--mode fail` reports Applied=False.
Only tests/lab use it (via NETFENCE_LAB_AGENT); it is never the lab's agent otherwise.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("ack", "never", "fail"), default="ack")
    ap.add_argument("--node", required=True)
    ap.add_argument("--rules-file", required=True)
    ap.add_argument("--status-file", required=True)
    ap.add_argument("--metrics-bind-address")
    ap.add_argument("--netns-dir")
    ap.add_argument("--cni-dir")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    seen = None
    while True:
        try:
            st = os.stat(a.rules_file)
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp and stamp != seen and a.mode != "never":
            seen = stamp
            with open(a.rules_file) as f:
                text = f.read()
            rs = json.loads(text)
            applied = a.mode == "ack"
            status = {
                "observedGeneration": rs["metadata"]["generation"],
                "appliedHash": "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
                "lastAppliedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "conditions": [{"type": "Applied", "status": "True" if applied else "False",
                                "reason": "Acknowledged" if applied else "StubFailure",
                                "message": "ack-only stub: nothing enforced"}],
            }
            tmp = a.status_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, a.status_file)
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
