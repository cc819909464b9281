"""Adapters that let other evaluation frameworks run embedjax models.

Each adapter lives in its own submodule and is imported only when used, so
``import embedjax`` never pulls in a framework (or its dependencies):

- ``embedjax.integrations.mteb``: ``MTEBEncoder``, an encoder for ``mteb`` 2.x
  (``pip install mteb``), plus task builders for local data.
"""
