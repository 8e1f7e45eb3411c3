"""SPoT (Vu et al., ACL 2022): soft prompts as task embeddings, retrieval and transfer.

Where things are (a newcomer reads `core.py` first):

  core.py       the method: prompt libraries (transfer prompt + task embedding per
                entry), the two similarity metrics, ranking, top-k weights / average
  plots.py      similarity CSVs, heatmap, dendrogram, text tables
  discovery.py  prompts and validation scores in training runs' checkpoints
  export.py     a run's prompt -> library entry (.npy + .json) or PEFT adapter, and
                a PEFT adapter -> library entry
  mixtures.py   the target + top-k sources seqio mixture
  transfer.py   best-of-top-k and the mixture transfer: training runs, launched as a
                user would (command-line layer; nothing here imports it)
  cli.py        `python -m hyperprompt_jax.spot <subcommand>`

Prompt files (`.npy`, PEFT adapters) are read and checked by
`hyperprompt_jax.prompt_files`; the transfer itself is prompt tuning initialised from
a prompt file (`gin/methods/spot.gin`, `prompts.FromFile` / `prompts.WeightedFiles`).
The library names are re-exported here (`from hyperprompt_jax import spot;
spot.rank_sources(...)`).
"""

from hyperprompt_jax.prompt_files import (  # noqa: F401
    METADATA_SUFFIX,
    PROMPT_SUFFIX,
    check_prompt,
    load_prompt_file,
    read_metadata,
    save_prompt,
)
from hyperprompt_jax.spot.core import (  # noqa: F401
    DEFAULT_METRIC,
    EMBEDDING_SUFFIX,
    METRICS,
    WEIGHTINGS,
    PromptEntry,
    PromptLibrary,
    RankedSource,
    SimilarityMetric,
    cosine_of_average_tokens,
    get_metric,
    per_token_average_cosine,
    rank_sources,
    similarity_matrix,
    top_k_weighted_average,
    top_k_weights,
)
from hyperprompt_jax.spot.discovery import (  # noqa: F401
    CheckpointPrompt,
    EvalScore,
    best_eval_score,
    checkpoint_steps,
    find_prompt_paths,
    read_checkpoint_prompt,
    read_eval_metrics,
    resolve_checkpoint,
    task_from_config,
)
from hyperprompt_jax.spot.export import (  # noqa: F401
    export_peft,
    export_prompt,
    import_peft,
    load_target_prompt,
    write_peft_export,
)
from hyperprompt_jax.spot.mixtures import (  # noqa: F401
    MIXTURE_RATES,
    mixture_name,
    register_topk_mixture,
    source_tasks,
)
from hyperprompt_jax.spot.plots import (  # noqa: F401
    format_matrix,
    plot_dendrograms,
    plot_heatmaps,
    read_matrix_csv,
    similarity_linkage,
    similarity_report,
    write_matrix_csv,
)
