"""lejepa_scale: LeJEPA pretraining of timm vision encoders, from a CPU demo to FSDP2 on SLURM.

The method's pieces for use in other code (imported on first use, so that the light commands, such
as the batch script's lines, do not import torch); the command-line entry points are the modules
`train`, `launch`, `evaluate`, `plan`, `report`, `demo` and `pretrained` (`python -m lejepa_scale.<name>`).
"""

from importlib import import_module
from importlib.metadata import version

__version__ = version("lejepa-scale")  # the one distribution both packages ship in
_EXPORTS = {
    "LeJEPALoss": "lejepa_scale.method.objective",
    "LeJEPAModel": "lejepa_scale.method.model",
    "SIGReg": "lejepa_scale.method.sigreg",
    "epps_pulley": "lejepa_scale.method.sigreg",
    "load_config": "lejepa_scale.config",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lejepa_scale' has no attribute {name!r}")
