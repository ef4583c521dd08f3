"""How ranks share the work: the process groups the project creates, FSDP2/HSDP with activation
checkpointing and compile, float8, and the collectives (autograd-aware sums, agreements)."""
