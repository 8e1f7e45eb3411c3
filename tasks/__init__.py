"""seqio tasks and mixtures of hyperprompt-jax; importing this package registers them.

Registered (all names start with `hp_`; see `tasks/README.md` for the full list):

- GLUE (`glue.py`): `hp_glue_<name>_v002`, `hp_glue_v002_proportional`.
- SuperGLUE (`super_glue.py`): `hp_super_glue_<name>_v102`, the simple WSC tasks,
  `hp_dpr_v001_simple`, `hp_super_glue_v102_proportional`.
- Multi-task mixtures with int32 `task_id` (`mixtures.py`): `hp_glue_v002_multitask`,
  `hp_super_glue_v102_multitask` (documented task-id orders there).
- SPoT sources (`spot.py`): `hp_c4_v220_prefix_lm`, `hp_squad_v010_allanswers`,
  `hp_spot_<dataset>`, the family mixtures `hp_spot_<family>` and `hp_spot_mix`.

Every task reads prepared TFDS data only and raises `DatasetNotPreparedError` with
the preparation command otherwise (`sources.py`); the vocabulary is T5's SentencePiece
model, swappable by gin or `HYPERPROMPT_VOCAB` (`vocab.py`).
"""

from hyperprompt_jax.tasks import (  # noqa: F401  (registers)
    glue,
    mixtures,
    spot,
    super_glue,
    synthetic,  # noqa: F401,E402  (the quickstart mixture)
)
from hyperprompt_jax.tasks.sources import DatasetNotPreparedError  # noqa: F401
from hyperprompt_jax.tasks.vocab import get_default_vocabulary, get_output_features  # noqa: F401
