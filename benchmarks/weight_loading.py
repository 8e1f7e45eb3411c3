"""Memory and bytes read while loading a T5.1.1-base-shaped t5x checkpoint, before and after.

    python benchmarks/weight_loading.py --workdir=/tmp/weight_loading [--method=prompt_tuning]

1. Writes a T5.1.1-base-shaped checkpoint (random float32 weights) in t5x's legacy
   tensorstore format (`save_t5x_checkpoint`, t5x's layout) once.
2. In fresh subprocesses with 8 fake CPU devices (`data 2 x model 4`), builds the
   train state from it two ways and prints one table:
   * `after`: this package's loader (`Trainer.init_state_from_params` on the lazy
     source: slices read straight into the shardings, only method parameters
     initialised, then the optimizer state);
   * `before`: the previous path, reproduced: the whole checkpoint read into host
     NumPy (`load_t5x_checkpoint`), a complete random train state built first
     (`Trainer.init_state`), then overwritten with the loaded arrays and a new
     optimizer state.
   Columns: peak RSS of the process above its RSS before loading, the bytes all devices
   hold at the end (the sharded state, replicas included; on CPU the devices' memory is
   host memory), their ratio, bytes read from the checkpoint by the process, and the
   bytes the fullest device holds at the end.
3. Two processes x two devices (`jax.distributed`, gloo): each process loads the same
   checkpoint on a `data 1 x model 4` mesh and reports the bytes it read.
4. With `--prompt_run`: prompt tuning of that T5.1.1-base with the launcher (byte
   vocabulary, the synthetic mixture, 4 steps, a checkpoint every 2), trainable-only
   checkpoints (the default) and self-contained ones: bytes of one checkpoint and of
   the whole `MODEL_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

LENGTHS = {"inputs": 32, "targets": 4}


def _trainer(method: str, model: int, devices=None):
    import jax

    from hyperprompt_jax import partitioning

    devices = devices or jax.devices()
    partitioner = partitioning.Partitioner(num_partitions=model, devices=devices)
    return common.build_trainer(
        "models/t5_1_1_base.gin", method, 8, LENGTHS, partitioner=partitioner
    )


def write(path: str) -> None:
    import numpy as np

    from hyperprompt_jax import checkpoints, config

    shapes = checkpoints.t5_param_shapes(config.t5_1_1("base"))
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s, dtype=np.float32) * 0.05 for n, s in shapes.items()}
    checkpoints.save_t5x_checkpoint(checkpoints.unflatten_params(params), path, 0)


def load(path: str, mode: str, method: str, model: int) -> dict:
    import jax
    import numpy as np

    from hyperprompt_jax import checkpoints
    from hyperprompt_jax import trainer as trainer_lib

    trainer = _trainer(method, model)
    source_dir = checkpoints.find_t5x_checkpoint_dir(path)
    base_rss = common.rss_bytes()
    common.reset_peak_rss()
    if mode == "after":
        source = checkpoints.open_t5x(source_dir)
        state = trainer.init_state_from_params(source, source=path)
        bytes_read = source.bytes_read
    else:  # the previous path
        weights = checkpoints.flatten_params(checkpoints.load_t5x_checkpoint(path))
        bytes_read = sum(v.nbytes for v in weights.values())
        state = trainer.init_state()
        shardings = checkpoints.flatten_params(trainer.layout.param_shardings)
        fresh = checkpoints.flatten_params(state.params)
        for name, value in weights.items():
            fresh[name] = jax.make_array_from_callback(
                value.shape, shardings[name], lambda i, v=value: np.asarray(v[i])
            )
        params = checkpoints.unflatten_params(fresh)
        state = trainer.state_from_params(params)
        del weights, fresh, params
    jax.block_until_ready(state)
    peak = common.peak_rss_bytes() - base_rss
    leaves = jax.tree.leaves(state)
    per_device: dict = {}
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
    # What the devices hold (replicas over `data` count once per device): on CPU this is
    # host memory, the floor of the process's RSS growth.
    final = sum(per_device.values())
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "mode": mode,
        "peak_rss_above_start": peak,
        "final_state_bytes": final,
        "bytes_read": bytes_read,
        "max_device_bytes": max(per_device.values()),
        "device0_peak_bytes": stats.get("peak_bytes_in_use"),
        "checkpoint_bytes": sum(
            os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(source_dir) for f in fs
        ),
        "state_bytes_trainer": trainer_lib.tree_bytes(trainer.layout.abstract),
    }


def multihost_worker(path: str, process: int, port: int) -> dict:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process
    )
    from hyperprompt_jax import checkpoints

    trainer = _trainer("prompt_tuning", 4)
    source = checkpoints.open_t5x(checkpoints.find_t5x_checkpoint_dir(path))
    params = trainer.params_from_source(source, path)
    jax.block_until_ready(params)
    total = sum(int(t.shape and __import__("math").prod(t.shape)) * t.dtype.itemsize
                for t in source.tensors.values())  # fmt: skip
    return {"process": process, "bytes_read": source.bytes_read, "checkpoint_param_bytes": total}


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def prompt_runs(workdir: str, ckpt: str) -> None:
    gin_file = os.path.join(workdir, "bytes.gin")
    with open(gin_file, "w") as f:
        f.write("from __gin__ import dynamic_registration\nimport seqio\n"
                "VOCABULARY = @seqio.ByteVocabulary()\n")  # fmt: skip
    rows = []
    backbone = _du(ckpt)
    for name, extra in (("trainable-only (default)", []),
                        ("self-contained", ["--gin.train.self_contained_checkpoints=True"])):  # fmt: skip
        model_dir = os.path.join(workdir, "pt_" + name.split()[0])
        cmd = [
            sys.executable, "-m", "hyperprompt_jax.train", "--gin_file=runs/finetune.gin",
            "--gin_file=models/t5_1_1_base.gin", "--gin_file=methods/prompt_tuning.gin",
            f"--gin_file={gin_file}", f"--gin.MODEL_DIR={model_dir!r}",
            "--gin.MIXTURE_OR_TASK_NAME='hp_synthetic_multitask'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}", "--gin.TRAIN_STEPS=4",
            "--gin.SAVE_PERIOD=2", "--gin.BATCH_SIZE=2", "--gin.LOG_PERIOD=1",
            "--gin.train.eval_dataset_cfg=None", f"--gin.INITIAL_CHECKPOINT_PATH={ckpt!r}",
            *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                              capture_output=True, text=True, timeout=7200)  # fmt: skip
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        one = _du(os.path.join(model_dir, "checkpoint_4"))
        rows.append([name, f"{one:,}", f"{one / backbone:.4%}", f"{_du(model_dir):,}"])
    print(f"\nPrompt tuning T5.1.1-base (backbone checkpoint {backbone:,} bytes), "
          "4 steps, SAVE_PERIOD=2, KEEP=3:\n")  # fmt: skip
    print(
        common.markdown_table(
            ["checkpoints", "one checkpoint (bytes)", "of the backbone", "MODEL_DIR (bytes)"], rows
        )
    )


def _child(args: list[str], env_extra: dict) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/weight_loading")
    parser.add_argument("--method", default="prompt_tuning", choices=sorted(common.METHODS))
    parser.add_argument("--child", choices=("write", "load", "multihost"))
    parser.add_argument("--mode", default="after")
    parser.add_argument("--process", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--prompt_run", action="store_true", help="only section 4")
    args = parser.parse_args()
    ckpt = os.path.join(args.workdir, "t5_1_1_base")
    if args.prompt_run:
        if not os.path.isdir(ckpt):
            _child(["--child=write", f"--workdir={args.workdir}"], {})
        prompt_runs(args.workdir, ckpt)
        return
    if args.child == "write":
        write(ckpt)
        print("RESULT {}")
        return
    if args.child == "load":
        print("RESULT " + json.dumps(load(ckpt, args.mode, args.method, 4)))
        return
    if args.child == "multihost":
        print("RESULT " + json.dumps(multihost_worker(ckpt, args.process, args.port)))
        return

    print(common.machine_header(("jax", "jaxlib", "flax", "orbax.checkpoint", "tensorstore")))
    if not os.path.isdir(ckpt):
        _child(["--child=write", f"--workdir={args.workdir}"], {})
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    rows = []
    for mode in ("before", "after"):
        r = _child(
            ["--child=load", f"--mode={mode}", f"--workdir={args.workdir}", f"--method={args.method}"],
            eight,
        )  # fmt: skip
        rows.append([
            mode, f"{r['peak_rss_above_start'] / common.GIB:.2f}",
            f"{r['final_state_bytes'] / common.GIB:.2f}",
            f"{r['peak_rss_above_start'] / r['final_state_bytes']:.2f}x",
            f"{r['bytes_read'] / common.GIB:.2f}", f"{r['max_device_bytes'] / 2**20:.1f}",
        ])  # fmt: skip
    print(f"\nLoading T5.1.1-base ({args.method}) from a t5x checkpoint "
          f"({r['checkpoint_bytes'] / common.GIB:.2f} GiB on disk), data 2 x model 4 "
          "on 8 fake CPU devices:\n")  # fmt: skip
    print(common.markdown_table(
        ["path", "peak RSS above start (GiB)", "sharded state on devices (GiB)", "peak / state",
         "bytes read (GiB)", "max per device (MiB)"], rows))  # fmt: skip

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child=multihost",
                f"--workdir={args.workdir}",
                f"--process={i}",
                f"--port={port}",
            ],
            env=dict(os.environ, JAX_PLATFORMS="cpu", **two),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not lines:
            raise RuntimeError(err[-3000:])
        results.append(json.loads(lines[-1][7:]))
    print("\nTwo processes x two devices (data 1 x model 4), each loading the checkpoint:\n")
    print(common.markdown_table(
        ["process", "bytes read (GiB)", "checkpoint parameters (GiB)", "share"],
        [[r["process"], f"{r['bytes_read'] / common.GIB:.3f}",
          f"{r['checkpoint_param_bytes'] / common.GIB:.3f}",
          f"{r['bytes_read'] / r['checkpoint_param_bytes']:.2f}"] for r in results]))  # fmt: skip


if __name__ == "__main__":
    main()
