"""The wheel half of m3fuse: the pinned AITER/FlyDSL wheels.

One module per job, in the order the wheel step runs them (m3fuse/patching/ is the model):

- lock: read and validate `wheels.lock` (a PEP 751 document), edit it for `m3fuse lock add`;
- plan: lock + target environment -> one action per wheel (install/upgrade/downgrade/keep);
- fetch: obtain verified copies (cache, --find-links, file://, https with resume);
- check: pre-install checks on each verified file (tags, archive paths, metadata, AITER API);
- install: the target's own pip (one run for all wheels) and the installed-state probe;
- step: the whole step (inspect -> plan -> obtain -> check -> install -> prove), what the CLI calls.

This file imports nothing: `m3fuse verify --no-wheels` must not pay for any of it.
"""
