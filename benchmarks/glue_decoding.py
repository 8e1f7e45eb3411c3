"""Decoding speed on GLUE-shaped inputs: our jitted greedy and beam search vs `generate`.

    python benchmarks/glue_decoding.py                   # T5.1.1-small, batch 32, GLUE lengths
    python benchmarks/glue_decoding.py --batch_size=64 --beams=4 --benchmark=super_glue
    python benchmarks/glue_decoding.py --quick           # tiny model: checks it runs

One randomly initialised T5.1.1-small-shaped model (ours, `models/t5_1_1_<size>.gin`) is
written as a Hugging Face directory (`checkpoints.save_hf_t5`) and loaded by
`transformers.T5ForConditionalGeneration`, so both decode with the same weights.
`--examples` inputs with GLUE / SuperGLUE lengths (`glue_shapes.py`) are decoded in
batches of `--batch_size`, up to `--max_decode_length` tokens:

* **ours**: `EncoderDecoderModel.predict_batch` under `jax.jit`, greedy
  (`decoding.temperature_sample`, temperature 0) and beam search (`decoding.beam_search`,
  `alpha=0`: no length normalisation), in the batches evaluation and inference use
  (`data.decoding_batches`: longest inputs first, each batch cut to its longest input
  rounded up to 64, one compilation per width); `--batching=fixed` pads to
  `--inputs_length` in input order instead (or, with `--bucket`, to the batch's longest
  rounded up to a multiple of 64);
* **HF**: `model.generate` (greedy; `num_beams`, `length_penalty=0`), each batch padded
  to its longest input, in input order (`--hf_sorted=1`: in the same longest-first
  batches as ours).

Each side first decodes every batch once (compilation, warm-up), then is timed over a
second pass. The outputs are compared token for token (tokens after EOS ignored) and
the share of identical rows is printed. Generated tokens per second counts every
token a row produced up to and including its EOS (or the length limit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import glue_shapes  # noqa: E402
import throughput  # noqa: E402


def make_inputs(args: argparse.Namespace):
    """`--examples` EOS-terminated random token arrays with GLUE-shaped lengths."""
    import numpy as np

    names = glue_shapes.GLUE_TASKS if args.benchmark == "glue" else glue_shapes.SUPER_GLUE_TASKS
    n_in, _, _, source = glue_shapes.sample_examples(names, args.examples, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    out = [
        np.append(rng.integers(3, 32000, min(int(n), args.inputs_length) - 1), 1).astype(np.int32)
        for n in n_in
    ]
    return out, source


def _padded(rows, length: int):
    import numpy as np

    out = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def _until_eos(row, eos: int = 1) -> tuple[int, ...]:
    row = [int(t) for t in row]
    return tuple(row[: row.index(eos) + 1] if eos in row else row)


def _result(seconds: float, warm: float, seqs: list) -> dict:
    """A worker's record of one decoding mode: the timed pass, the first pass, the
    generated tokens (up to and including EOS) and the sequences, in input order."""
    return dict(
        seconds=seconds, warm=warm, tokens=sum(len(s) for s in seqs), seqs=[list(s) for s in seqs]
    )


def worker_ours(args: argparse.Namespace, hf_dir: str) -> dict:
    import jax
    import numpy as np

    from hyperprompt_jax import checkpoints, data, decoding

    # The model's output vocabulary (its EOS id) is the T5 SentencePiece model.
    os.environ.setdefault("HYPERPROMPT_VOCAB", glue_shapes.spm_path())
    trainer = common.build_trainer(
        f"models/t5_1_1_{args.size}.gin",
        "model_tuning",
        args.batch_size,
        {"inputs": args.inputs_length, "targets": args.max_decode_length},
        bindings=["DROPOUT_RATE=0.0", "ACTIVATION_DTYPE='float32'"],
    )
    model = trainer.model
    params = trainer.init_state().params
    checkpoints.save_hf_t5(model.module.config, jax.device_get(params), hf_dir)
    inputs, source = make_inputs(args)
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    features = [
        {
            "encoder_input_tokens": _padded([row], args.inputs_length)[0],
            "decoder_input_tokens": np.zeros(args.max_decode_length, np.int32),
        }
        for row in inputs
    ]
    out = {"source": source}
    for mode in ("greedy", "beam"):
        if mode == "greedy":
            model.decode_fn = decoding.temperature_sample
            num_decodes, decoder_params = 1, {"temperature": 0.0}
        else:
            model.decode_fn = decoding.beam_search
            num_decodes, decoder_params = args.beams, {"alpha": 0.0}

        def predict_fn(p, enc, dec, num_decodes=num_decodes, decoder_params=decoder_params):
            return model.predict_batch(
                p,
                {"encoder_input_tokens": enc, "decoder_input_tokens": dec},
                num_decodes=num_decodes,
                decoder_params=dict(decoder_params),
            )

        predict = jax.jit(predict_fn)

        def run(rows, predict=predict):
            length = args.inputs_length
            if args.bucket:
                length = min(args.inputs_length, -(-max(map(len, rows)) // 64) * 64)
            enc = _padded(rows, length)
            dec = np.zeros((len(rows), args.max_decode_length), np.int32)
            return np.asarray(jax.block_until_ready(predict(params, enc, dec)))

        def run_all(predict=predict):
            """Every input's tokens, in input order."""
            if args.batching == "fixed":
                return [row for rows in batches for row in run(rows)]
            # What evaluation and inference do: longest inputs first, each batch cut to
            # its longest input rounded up to data.INPUT_LENGTH_BUCKET.
            out = [None] * len(inputs)
            for positions, batch in data.decoding_batches(features, args.batch_size):
                enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
                tokens = np.asarray(jax.block_until_ready(predict(params, enc, dec)))
                for position, row in zip(positions, tokens, strict=False):
                    out[position] = row
            return out

        start = time.perf_counter()
        run_all()
        warm = time.perf_counter() - start
        start = time.perf_counter()
        decoded = run_all()
        seconds = time.perf_counter() - start
        out[mode] = _result(seconds, warm, [_until_eos(r) for r in decoded])
    return out


def worker_hf(args: argparse.Namespace, hf_dir: str) -> dict:
    import torch
    from transformers import T5ForConditionalGeneration

    torch.set_num_threads(args.torch_threads)
    model = T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    inputs, _ = make_inputs(args)
    order = list(range(len(inputs)))
    if args.hf_sorted:  # The same longest-first batches as ours.
        order.sort(key=lambda i: -len(inputs[i]))
    batches = [
        [inputs[i] for i in order[s : s + args.batch_size]]
        for s in range(0, len(order), args.batch_size)
    ]
    out = {}
    for mode in ("greedy", "beam"):
        kwargs = dict(max_new_tokens=args.max_decode_length, do_sample=False)
        if mode == "beam":
            kwargs.update(num_beams=args.beams, length_penalty=0.0, early_stopping=True)
        else:
            kwargs.update(num_beams=1)

        def run(rows, kwargs=kwargs):
            ids = torch.from_numpy(_padded(rows, max(map(len, rows)))).long()
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), **kwargs)
            return gen[:, 1:].numpy()  # Drop the decoder start token.

        start = time.perf_counter()
        for rows in batches:
            run(rows)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        decoded = [r for rows in batches for r in run(rows)]
        seconds = time.perf_counter() - start
        seqs = [None] * len(inputs)
        for position, row in zip(order, decoded, strict=True):
            seqs[position] = _until_eos(row)
        out[mode] = _result(seconds, warm, seqs)
    return out


WORKER_FLAGS = (
    "benchmark", "size", "examples", "batch_size", "inputs_length", "max_decode_length",
    "beams", "seed", "torch_threads", "bucket", "batching", "hf_sorted",
)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="glue", choices=["glue", "super_glue"])
    parser.add_argument("--size", default="small", choices=sorted(throughput.SHAPES))
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--max_decode_length", type=int, default=8)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument(
        "--batching",
        default="library",
        choices=["library", "fixed"],
        help="ours: library = evaluation's and inference's batches (longest first, cut to "
        "the longest input, data.decoding_batches); fixed = input order, --inputs_length",
    )
    parser.add_argument("--bucket", type=int, default=0, help="fixed batching: 64-multiples")
    parser.add_argument(
        "--hf_sorted", type=int, default=0, help="1: HF decodes the same longest-first batches"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--max_busy", type=float, default=0.2)
    parser.add_argument("--wait_timeout", type=float, default=600.0)
    parser.add_argument("--max_isa", default="", help="emulate an older CPU (common.cap_isa)")
    common.add_quick_flag(parser)
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--hf_dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import json

        fn = {"ours": worker_ours, "hf": worker_hf}[args.worker]
        print(json.dumps(fn(args, args.hf_dir)))
        return 0
    common.apply_quick(
        args, size="tiny", examples=16, batch_size=8, inputs_length=128, wait_timeout=5.0
    )
    if args.max_isa:
        common.cap_isa(args.max_isa)
    print(common.machine_header(("jax", "jaxlib", "flax", "torch", "transformers")))
    hf_dir = tempfile.mkdtemp(prefix="glue_decoding_hf_")
    results: dict[str, list] = {"ours": [], "hf": []}
    for r in range(args.rounds):
        # Ours writes the HF weights, so it goes first in the first round.
        for kind in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            busy = common.wait_until_quiet(args.max_busy, args.wait_timeout)
            common.progress(f"round {r + 1}/{args.rounds}: {kind} (CPU busy before {busy:.0%})")
            cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}"]
            cmd += [f"--{n}={getattr(args, n)}" for n in WORKER_FLAGS] + [f"--hf_dir={hf_dir}"]
            results[kind].append(common.run_json_worker(cmd, kind))
    ours0, hf0 = results["ours"][0], results["hf"][0]
    print(
        f"T5.1.1-{args.size} shape, random weights (the same in both); {args.examples} "
        f"{args.benchmark} inputs (lengths from {ours0['source']}), batch {args.batch_size}, "
        f"up to {args.max_decode_length} tokens; ours "
        + (
            "in evaluation's batches (longest inputs first, each batch cut to its longest "
            "input rounded up to 64)"
            if args.batching == "library"
            else "padded to "
            + ("the batch's longest, rounded up to 64" if args.bucket else f"{args.inputs_length}")
        )
        + "; HF "
        + ("in the same longest-first batches" if args.hf_sorted else "in input order")
        + ", each batch padded to its longest"
    )
    loads = [o["others_busy"] for outs in results.values() for o in outs]
    print(
        f"CPU share used by other processes during the runs: min {min(loads):.0%}, median "
        f"{statistics.median(loads):.0%}, max {max(loads):.0%}\n"
    )

    def rate(kind: str, mode: str) -> float:
        outs = results[kind]
        quiet = [o for o in outs if o["others_busy"] <= args.max_busy] or outs
        return statistics.median(o[mode]["tokens"] / o[mode]["seconds"] for o in quiet)

    rows = []
    for mode in ("greedy", "beam"):
        same = sum(a == b for a, b in zip(ours0[mode]["seqs"], hf0[mode]["seqs"], strict=True))
        ours_r, hf_r = rate("ours", mode), rate("hf", mode)
        label = mode if mode == "greedy" else f"beam search ({args.beams} beams)"
        rows.append([
            label, f"{ours_r:,.0f}", f"{hf_r:,.0f}", f"{ours_r / hf_r:.2f}x",
            f"{same}/{len(ours0[mode]['seqs'])}",
            f"{ours0[mode]['warm']:.1f} / {hf0[mode]['warm']:.1f}",
        ])  # fmt: skip
    print(
        common.markdown_table(
            [
                "decoding",
                "ours tok/s",
                "HF tok/s",
                "ours / HF",
                "identical rows",
                "first pass s (ours, with compilation / HF)",
            ],
            rows,
        )  # fmt: skip
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
