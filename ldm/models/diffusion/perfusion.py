"""Where configs made before `ldm.perfusion` name the Perfusion model (`model.target`)."""
from ldm.perfusion.model import PerfusionLatentDiffusion  # noqa: F401
