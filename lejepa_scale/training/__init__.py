"""How one run trains: a Config becomes components (build), one optimisation step, metrics,
profiling, the process's random streams, the online probe and the FLOPs model."""
