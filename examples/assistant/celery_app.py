"""What ``celery -A examples.assistant.celery_app:celery_app worker`` loads.

The assistant configured from ``ASSISTANT_*`` environment variables, as the
web process is; set ``ASSISTANT_SCORIA_EXECUTOR=celery`` in both.
"""

from . import create_app

flask_app = create_app()
if "celery" not in flask_app.extensions:
    raise RuntimeError(
        "The assistant runs without Celery: set ASSISTANT_SCORIA_EXECUTOR=celery (and"
        " ASSISTANT_CELERY_BROKER_URL) for this worker and for the web process."
    )
celery_app = flask_app.extensions["celery"]
