"""Quality evaluation of ReSA against dense decoding on real models and real text.

Tasks (one module each): `lm_sim` (KV-misalignment language-modelling simulation), `drift`
(free generation, dense vs sparse vs ReSA). Shared pieces: `data` (corpora), `models` (which
checkpoint), `store` (resumable JSON run files), `stats` (intervals), `report` (markdown, plots).
"""
