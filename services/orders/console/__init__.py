"""The operator console (README, "Operator console"): HTML pages under ``/console/``
served by the orders service; reads in ``reads.py`` (one module per page, over
``sources.py``), actions in ``actions.py``, the pages and their guard (operator token,
CSRF) in ``routes.py``."""
