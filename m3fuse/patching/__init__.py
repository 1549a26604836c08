"""The patch engine: patch sets as data, exact hunk application, content-based state, and
the locked, staged transaction that moves a vLLM tree between pristine and patched."""
