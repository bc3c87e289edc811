"""The extension objects, created once and bound to each app by ``create_app``."""

from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

import flask_scoria

db = SQLAlchemy()
#: flask-scoria on the app's own engine, in its own short transactions.
runtime = flask_scoria.Scoria(db=db)
#: Flask-Migrate for the app's tables; ``include_name`` hides the scoria_* ones.
migrate = Migrate(include_name=flask_scoria.include_name)
