"""What LeJEPA is: the timm backbone and projector, the objective, SIGReg, the optional SWA target
and the label-free embedding health."""
