"""refit: keep a deployed language model fresh, automatically and cheaply.

Importing this package loads nothing heavy: no Prefect, torch or MLflow.
"""

__version__ = "0.1.0"
