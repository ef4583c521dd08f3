"""lejepa_scale: LeJEPA pretraining of timm vision encoders, from a CPU demo to FSDP2 on SLURM.

The method's pieces for use in other code; the command-line entry points are the modules
`train`, `launch`, `evaluate`, `plan`, `report`, `demo` and `pretrained` (`python -m lejepa_scale.<name>`).
"""

from importlib.metadata import version

from lejepa_scale.config import load_config
from lejepa_scale.model import LeJEPAModel
from lejepa_scale.objective import LeJEPALoss
from lejepa_scale.sigreg import SIGReg, epps_pulley

__version__ = version("lejepa-scale")  # the one distribution both packages ship in
__all__ = ["LeJEPALoss", "LeJEPAModel", "SIGReg", "__version__", "epps_pulley", "load_config"]
