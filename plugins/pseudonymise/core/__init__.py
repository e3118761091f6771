"""The pure core of the plugin (no Airflow import): tokens, pseudonyms, escrow, audit, file I/O.

The CLI, the Airflow operators and the HTTP API all build on these modules, so a pseudonym made
by any of them is the same pseudonym.
"""
