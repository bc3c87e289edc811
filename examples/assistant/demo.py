"""``make demo``: the assistant on embedded SQLite, migrated, on 127.0.0.1.

The port comes from ``PORT`` (default 5000).
"""

from __future__ import annotations

import os

from . import create_app
from .database import prepare
from .extensions import runtime


def main() -> None:
    app = create_app()
    with app.app_context():
        prepare()
    port = int(os.environ.get("PORT", "5000"))
    url = f"http://127.0.0.1:{port}/"
    prefix = runtime.settings(app).url_prefix.lstrip("/")
    print(
        f"flask-scoria example assistant: {url}\n"
        f"  database: {app.config['SQLALCHEMY_DATABASE_URI']} (both migration histories applied)\n"
        "  sign in as alice (member, asks questions) and, in another browser, as ops\n"
        f"  (operator, approves at {url}{prefix}/approvals); no passwords.\n"
        "  The assistant's model is a deterministic stand-in: examples/assistant/model_client.py",
        flush=True,
    )
    app.run(host="127.0.0.1", port=port, debug=False, use_reloader=False)


if __name__ == "__main__":
    main()
