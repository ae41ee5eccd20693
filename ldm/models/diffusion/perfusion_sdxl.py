"""Where configs made before `ldm.perfusion` name the Perfusion SDXL model (`model.target`)."""
from ldm.perfusion.sdxl import PerfusionSDXL  # noqa: F401
