"""SPoT on synthetic tasks: retrieval and transfer through the real launcher.

    python benchmarks/spot_synthetic.py --workdir=/tmp/spot_synthetic --config=full
    python benchmarks/spot_synthetic.py --workdir=/tmp/spot_small --config=small

A tiny T5 (byte vocabulary) is first model-tuned on instructions "<rule>: <letters>"
for four rules (first / last / min / max letter), so the frozen backbone "knows" the
rules when told. Prompts are then tuned on inputs WITHOUT the instruction, so a
prompt has to say which rule applies:
  target     syn_max        max letter of 8 letters
  related    syn_max_short  the same rule on 6-letter strings (another domain)
  unrelated  syn_first      first letter of 8 letters
The target's embedding comes from a short prompt-tuning run on the target (as in the
paper). Sources and probe start from different random prompts (different seeds).

`small` (about a minute on 2 CPU cores, no evaluation) trains the backbone, the
sources and the probe and prints the rankings; tests/test_spot.py runs it and checks
that the related source ranks first. `full` also trains the transfers (best_of_topk
over both sources) and a fresh prompt, and prints the curves the docs (docs/spot.md)
report.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hyperprompt_jax import spot
from hyperprompt_jax.spot import cli, transfer

_SYN_RULES = {"first": lambda s: s[0], "last": lambda s: s[-1], "min": min, "max": max}
_SYN_SIZES = {"train": 20000, "validation": 256}
# name -> (rule, string length, data seed)
_SYN_PROMPT_TASKS = {
    "syn_max": ("max", 8, 1),
    "syn_max_short": ("max", 6, 2),
    "syn_first": ("first", 8, 3),
}
_SYN_CONFIGS = {
    # The test: about a minute of training on 2 CPU cores, no evaluation.
    "small": dict(backbone_steps=600, source_steps=150, probe_steps=30, transfer_steps=0),
    # The docs' numbers: evaluation every 5 steps of the transfers.
    "random_backbone": dict(backbone_steps=0, source_steps=150, probe_steps=30, transfer_steps=0),
    "full": dict(backbone_steps=1500, source_steps=300, probe_steps=30, transfer_steps=150),
}
_SYN_GIN = """from __gin__ import dynamic_registration
import seqio
include 'runs/finetune.gin'
include 'models/t5_1_1_tiny.gin'
VOCABULARY = @seqio.ByteVocabulary()
NUM_EMBEDDINGS = 384
TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 2}
BATCH_SIZE = 32
LOG_PERIOD = 100
SAVE_PERIOD = 100000
KEEP = 1
"""

_SYN_NO_EVAL_GIN = """from __gin__ import dynamic_registration
import hyperprompt_jax.train as train_script
train_script.train.eval_dataset_cfg = None
"""


def _register_synthetic_tasks() -> None:
    import seqio
    import tensorflow as tf
    from hyperprompt_jax.tasks import metrics as hp_metrics

    vocab = seqio.ByteVocabulary()
    features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}

    def add(name, rule, length, data_seed, prefix=None):
        def dataset_fn(split, shuffle_files=False, seed=None):
            del shuffle_files, seed  # In memory; seqio shuffles.
            rng = np.random.RandomState(data_seed + (0 if split == "train" else 1000))
            letters = rng.randint(0, 8, size=(_SYN_SIZES[split], length))
            strings = ["".join("abcdefgh"[i] for i in row) for row in letters]
            inputs = [f"{prefix}: {s}" if prefix else s for s in strings]
            targets = [_SYN_RULES[rule](s) for s in strings]
            return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                dataset_fn, splits=tuple(_SYN_SIZES), num_input_examples=_SYN_SIZES
            ),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
            postprocess_fn=lambda t, **_: t.decode() if isinstance(t, bytes) else t,
            output_features=features,
            metric_fns=[hp_metrics.accuracy],
        )

    for rule in _SYN_RULES:
        add(f"syn_pre_{rule}", rule, 8, 10, prefix=rule)
    seqio.MixtureRegistry.remove("syn_pre")
    seqio.MixtureRegistry.add("syn_pre", [(f"syn_pre_{r}", 1.0) for r in _SYN_RULES])
    for name, (rule, length, data_seed) in _SYN_PROMPT_TASKS.items():
        add(name, rule, length, data_seed)


def _steps_to_reach(rows: list, threshold: float):
    for r in sorted(rows, key=lambda r: r["step"]):
        if r["accuracy"] >= threshold:
            return r["step"]
    return None


def run_synthetic_experiment(workdir: str, config: str = "small") -> dict:
    """Backbone -> source prompts -> library -> target probe -> ranking (-> transfers).

    Runs every training in this process through the launcher (`train.main`). Returns
    the rankings (and, for 'full', the transfer curves and steps to 99% accuracy).
    """
    import time

    import jax
    import orbax.checkpoint as ocp

    from hyperprompt_jax import checkpoints, train
    from hyperprompt_jax import trainer as trainer_lib

    cfg = _SYN_CONFIGS[config]
    os.makedirs(workdir, exist_ok=True)
    # Every prompt-tuning run compiles the same programs: reuse them across runs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    _register_synthetic_tasks()
    gin_file = os.path.join(workdir, "synthetic.gin")
    with open(gin_file, "w") as f:
        f.write(_SYN_GIN)
    no_eval_file = os.path.join(workdir, "no_eval.gin")
    with open(no_eval_file, "w") as f:
        f.write(_SYN_NO_EVAL_GIN)
    no_eval = f"--gin_file={no_eval_file}"
    timings = {}

    def run(name, method, task, steps, *flags):
        start = time.time()
        code = train.main([
            f"--gin_file={gin_file}", f"--gin_file=methods/{method}.gin",
            f"--gin.MODEL_DIR={os.path.join(workdir, name)!r}",
            f"--gin.MIXTURE_OR_TASK_NAME={task!r}", f"--gin.TRAIN_STEPS={steps}", *flags,
        ])  # fmt: skip
        timings[name] = round(time.time() - start, 1)
        if code != 0:
            raise RuntimeError(f"Training run {name} failed (exit {code}).")
        return os.path.join(workdir, name)

    # 1. The backbone, converted to a t5x checkpoint for INITIAL_CHECKPOINT_PATH.
    steps = cfg["backbone_steps"]
    prompt_flags = ["--gin.PROMPT_LENGTH=8"]
    if steps:
        backbone = run(
            "backbone", "model_tuning", "syn_pre", steps, "--gin.LEARNING_RATE=0.01", no_eval
        )
        tree = ocp.PyTreeCheckpointer().restore(
            os.path.abspath(os.path.join(backbone, f"checkpoint_{steps}", "default"))
        )
        params = trainer_lib.merge_params(tree["trainable"], tree.get("frozen") or {})
        backbone_t5x = checkpoints.save_t5x_checkpoint(
            params, os.path.join(workdir, "backbone_t5x"), steps
        )
        prompt_flags.append(f"--gin.INITIAL_CHECKPOINT_PATH={backbone_t5x!r}")

    # 2. Source prompts -> the library (export reads the launcher's checkpoints).
    library = os.path.join(workdir, "library")
    evaluate = [] if config == "small" else [f"--gin.EVAL_PERIOD={cfg['source_steps']}"]
    for seed, (name, task) in enumerate(
        (("max_short", "syn_max_short"), ("first", "syn_first")), 1
    ):
        run_dir = run(
            f"source_{name}", "prompt_tuning", task, cfg["source_steps"], *prompt_flags,
            f"--gin.RANDOM_SEED={seed}", *(evaluate or [no_eval]),
        )  # fmt: skip
        assert cli.main(
            ["export", f"--checkpoint={run_dir}", f"--output={os.path.join(library, name)}.npy",
             "--model=tiny_bytes", "--emb_dim=64", "--length=8"]
        ) == 0  # fmt: skip

    # 3. The target's embedding: a short prompt-tuning run on the target.
    probe = run(
        "target_probe", "prompt_tuning", "syn_max", cfg["probe_steps"], *prompt_flags,
        "--gin.RANDOM_SEED=3", no_eval,
    )  # fmt: skip
    result: dict = {"config": config, "ranking": {}, "timings": timings}
    for metric in spot.METRICS:
        out = os.path.join(workdir, f"ranking_{metric}.json")
        assert cli.main(
            ["rank", f"--library={library}", f"--target={probe}", f"--metric={metric}",
             f"--output={out}", "--emb_dim=64"]
        ) == 0  # fmt: skip
        with open(out) as f:
            rows = json.load(f)["ranking"]
        result["ranking"][metric] = [(r["name"], r["similarity"]) for r in rows]
    if not cfg["transfer_steps"]:
        return result

    # 4. Transfers: best of top-2 (both sources) and a fresh prompt, same settings.
    lib = spot.PromptLibrary.load(library)
    ranked = spot.rank_sources(lib, spot.load_target_prompt(probe))
    bindings = [
        f"{flag[len('--gin.'):]}" for flag in prompt_flags
    ] + ["MIXTURE_OR_TASK_NAME='syn_max'", f"TRAIN_STEPS={cfg['transfer_steps']}",
         "EVAL_PERIOD=5", "RANDOM_SEED=4", "LEARNING_RATE=0.01"]  # fmt: skip
    best = transfer.best_of_topk(
        lib, ranked, 2, model_dir=os.path.join(workdir, "best_of_top2"),
        gin_files=[gin_file, "methods/spot.gin"], gin_bindings=bindings, task="syn_max",
        launcher=transfer.in_process_launcher,
    )  # fmt: skip
    print(transfer.format_best_of_topk(best))
    fresh = run(
        "fresh", "prompt_tuning", "syn_max", cfg["transfer_steps"], *prompt_flags,
        "--gin.RANDOM_SEED=4", "--gin.EVAL_PERIOD=5", "--gin.LEARNING_RATE=0.01",
    )  # fmt: skip
    runs = {f"from {c.name}": c.model_dir for c in best.candidates} | {"fresh prompt": fresh}
    result["best_of_top2"] = best.best.name
    result["curves"] = {}
    for label, run_dir in runs.items():
        rows = spot.read_eval_metrics(run_dir)
        result["curves"][label] = {
            "accuracy_at": {r["step"]: r["accuracy"] for r in rows},
            "steps_to_99": _steps_to_reach(rows, 99.0),
            "final_accuracy": max(rows, key=lambda r: r["step"])["accuracy"],
        }
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SPoT synthetic retrieval/transfer experiment")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="full", choices=sorted(_SYN_CONFIGS))
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    outcome = run_synthetic_experiment(args.workdir, args.config)
    print(json.dumps(outcome, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=2)
