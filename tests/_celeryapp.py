"""What ``celery -A _celeryapp`` loads: the background tests' app, from the environment."""

from _background import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
