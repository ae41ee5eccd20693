"""Perfusion (Tewel et al., SIGGRAPH 2023): the method, on top of the latent-diffusion core.

    edit.py                 Eq. 3 and Appendix B (gated_rank1_edit), Rank1EditLinear, ConceptBank, ConceptState
    model.py, sdxl.py       the training model (PerfusionLatentDiffusion) and its SDXL variant
    concepts.py             concept files (safetensors)
    covariance.py           C and C^-1 of the text encodings; estimate_covariance.py: the command
    prompts.py              placeholder tokens and the prompts that name concepts
    inference.py            loading concepts for sampling, their gate settings and defaults
    gates.py                where each gate opens, token by token
"""
