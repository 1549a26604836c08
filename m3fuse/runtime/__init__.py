"""What the patched vLLM meets at run time: the known AITER defects, the environment each A/B
arm needs (`m3fuse env`), and the `vllm.general_plugins` guard that says, in every vLLM
process, which set and state the tree is in."""
