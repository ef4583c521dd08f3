"""What survives a kill: the checkpointer (async DCP, atomic completion, retention, resume), what a
model and optimizer store, the copy to host memory, HSDP replica shares and safe loading."""
