"""The catalog's methods: each module here registers its entries with :func:`bnnzoo.catalog.register`
when imported (the catalog imports every module of this package on first use)."""
