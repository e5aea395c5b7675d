"""Runs one sandbox image build with the public Tensorlake client (PyPI
`tensorlake`), exactly as its users call it, and prints one JSON line:
{"ok": bool, "result": <what the client returned>, "error": str, "events": [...]}.

Usage: build.py API_URL TOKEN NAMESPACE CONTEXT_DIR NAME PUBLIC(0|1)
The Dockerfile is CONTEXT_DIR/Dockerfile.
"""

import json
import os
import sys

from tensorlake._cloud_sdk import build_sandbox_image


def main():
    api_url, token, namespace, context, name, public = sys.argv[1:7]
    events = []

    def emit(event):
        events.append(event)
        # Progress for whoever watches the test's output (the builder's own log stays in the JSON).
        if not (isinstance(event, dict) and event.get("type") == "build_log"):
            print(f"[{name}] {event}", file=sys.stderr, flush=True)

    try:
        result = build_sandbox_image(
            api_url, token, os.path.join(context, "Dockerfile"), name, 64, None, 1.0, 512, public == "1",
            None, None, namespace, False, "snapsign-tests", False, None, context,
            cas=False, build_args=None, emit=emit, docker_config_json=None,
        )
        # The client returns the registered template as JSON text.
        if isinstance(result, (str, bytes)):
            result = json.loads(result)
        outcome = {"ok": True, "result": result, "error": None}
    except Exception as e:  # the client raises on any failed build
        outcome = {"ok": False, "result": None, "error": f"{type(e).__name__}: {e}"}
    outcome["events"] = events
    print(json.dumps(outcome, default=str), flush=True)


if __name__ == "__main__":
    main()
