"""``make demo``: the assistant on embedded SQLite, migrated, on 127.0.0.1.

The port comes from ``PORT`` (default 5000). The address is printed once the
server listens, so it can be opened at once; a port in use is reported with
the way out.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from werkzeug.serving import make_server

from . import create_app
from .database import prepare
from .extensions import runtime

HOST = "127.0.0.1"


def main() -> None:
    text = os.environ.get("PORT", "5000")
    if not text.isdigit() or not 0 < int(text) < 65536:
        sys.exit(f"PORT must be a port number from 1 to 65535, not {text!r}: make demo PORT=5001")
    port = int(text)
    app = create_app()
    with app.app_context():
        prepare()
    try:
        listening = socket.create_server((HOST, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        sys.exit(
            f"Port {port} on {HOST} is already in use (another demo, or another server).\n"
            f"Stop that one, or pick another port: make demo PORT={port + 1}"
        )
    with listening:
        server = make_server(HOST, port, app, threaded=True, fd=listening.fileno())
    url = f"http://{HOST}:{server.port}/"
    prefix = runtime.settings(app).url_prefix.lstrip("/")
    print(
        f"flask-scoria example assistant: {url}\n"
        f"  database: {app.config['SQLALCHEMY_DATABASE_URI']} (both migration histories applied)\n"
        "  sign in as alice (member, asks questions) and, in another browser, as ops\n"
        f"  (operator: {url}{prefix}/approvals lists the answers waiting; Review opens one\n"
        "  to approve it, edited if need be); zoe and gus are the same pair\n"
        "  in tenant globex. No passwords.\n"
        f"  An approval expires after {app.config['APPROVAL_EXPIRES_IN']} s"
        " (set ASSISTANT_APPROVAL_EXPIRES_IN).\n"
        "  The assistant's model and mail sender are deterministic stand-ins:\n"
        "  examples/assistant/model_client.py and mailer.py\n"
        "  Stop with Ctrl+C.",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
