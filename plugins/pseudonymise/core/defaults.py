"""Defaults and names that the engine and the command line share, in a module that imports nothing.

The command line shows them in its help before it loads the engine (SQLAlchemy, numpy, cryptography):
``pseudonymise file pseudonymise`` starts reading its input while those load.
"""

#: Rows a dry run reads by default (the first rows of the source).
DRY_RUN_SAMPLE = 1000
#: Default number of distinct classes a spill tap holds in memory before it spills them to disk.
MEMORY_GROUPS = 100_000
#: The risk report describes every combination of up to this many quasi-identifiers by default.
MAX_REPORT_QIS = 8
#: Environment variables the CLI reads the audit checkpoints' signing key and the verification keys from.
SIGNING_KEY_ENV = "PSEUDONYMISE_AUDIT_SIGNING_KEY"
PUBLIC_KEYS_ENV = "PSEUDONYMISE_AUDIT_PUBLIC_KEYS"
