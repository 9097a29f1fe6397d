"""The store of the application side: the named SQL of `queries.sql`, the schema and its
numbered migrations, the settings row and stored secrets.
"""
