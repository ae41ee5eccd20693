"""DreamBench (the DreamBooth dataset's protocol) for Perfusion: train every subject, render its 25
prompts x 4 seeds, score DINO, CLIP-I and CLIP-T, and tabulate per subject, per kind and overall.

`subjects` finds the subjects and their class words, `runner` trains and measures one subject and
writes its result file, `report` merges those files into report.md, results.json and tradeoff.png,
`toy` judges the toy world's renders with its scorer, `cli` is scripts/dreambench.py.
"""
