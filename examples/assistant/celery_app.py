"""What ``celery -A examples.assistant.celery_app:celery_app worker`` loads.

The assistant configured from ``ASSISTANT_*`` environment variables, as the
web process is; set ``ASSISTANT_SCORIA_EXECUTOR=celery`` in both.
"""

from . import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
