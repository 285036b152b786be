"""HEALTHCHECK probe: GET http://127.0.0.1:$PORT/health must answer 200 (standard library only)."""

import os
import sys
import urllib.request

port = os.environ.get("PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as e:
    print(f"health: {e}", file=sys.stderr)
    sys.exit(1)
