"""m3fuse: apply, verify and revert the MiniMax M3 AITER all-reduce + Gemma RMSNorm fusion."""

__version__ = "0.1.0"
