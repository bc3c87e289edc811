"""The operator evidence pages, a blueprint mounted at ``SCORIA_URL_PREFIX``."""

from .views import bp as bp
