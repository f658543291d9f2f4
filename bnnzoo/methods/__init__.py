"""The catalog's built-in methods: each module here registers its entries with
:func:`bnnzoo.catalog.register` when imported; ``bnnzoo/__init__.py`` imports them all."""
