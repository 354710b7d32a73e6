"""Expected failures end a run with one line naming the culprit: no traceback, exit status 1, on one process
and under the deepspeed launcher from whichever rank hits it. Bugs keep their traceback."""

import json
import os
import subprocess
import sys

import lmdb
import pytest
import torch

from repa_fast.data.dataset import rank_indices, read_samples_csv
from repa_fast.data.synthetic import write_synthetic_caches
from repa_fast.errors import InputError, RunError, one_line, run_main
from repa_fast.train import main as train_main
from repa_fast.train import resolve_ds_config_path

TINY = "configs/tiny.yaml"
N = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = write_synthetic_caches(root, num_samples=N, num_classes=4, latent_shape=(4, 16, 16), num_tokens=64,
                                   dino_D=64, clip_shape=(77, 32))
    return root, paths


def _paths_argv(paths: dict) -> list[str]:
    return [f"{k}={v}" for k, v in paths.items()]


def _csv(path, rows: list[str]) -> str:
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _ds_config(path, **changes) -> str:
    base = json.loads(resolve_ds_config_path("zero2").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            base.setdefault(section, {})[field] = value
        else:
            base[key] = value
    path.write_text(json.dumps(base))
    return str(path)


def _table(path, shape) -> str:
    torch.save(torch.zeros(shape, dtype=torch.float16), path)
    return str(path)


def _cases(root, paths, tmp):
    """(argv after the config's paths, words the one line must hold) per bad input."""
    csv_lines = (root / "train.csv").read_text().splitlines()
    (tmp / "not_a_cache").mkdir()
    (tmp / "no_ckpt" / "step_00000004").mkdir(parents=True)
    nometa = lmdb.open(str(tmp / "nometa"))
    with nometa.begin(write=True) as txn:
        txn.put(b"s0000000", b"\0" * 2048)
    nometa.close()
    (tmp / "bad.yaml").write_text("batch_size: lots\n")
    return {
        "unknown key": (["lerning_rate=1"], ["'lerning_rate'", "'learning_rate'"]),
        "wrong type": (["--config", str(tmp / "bad.yaml")], ["bad.yaml", "batch_size", "'lots'"]),
        "negative learning rate": (["learning_rate=-1e-4"], ["'learning_rate'", "positive", "-0.0001"]),
        "learning rate nan": (["learning_rate=nan"], ["'learning_rate'", "finite"]),
        "ema decay 1": (["ema_decay=1"], ["'ema_decay'", "[0, 1)"]),
        "ema decay negative": (["ema_decay=-0.5"], ["'ema_decay'", "[0, 1)"]),
        "lora rank 0": (["lora_rank=0"], ["'lora_rank'", "positive"]),
        "cfg dropout": (["cfg_dropout=1.5"], ["'cfg_dropout'", "[0, 1]"]),
        "negative seed": (["seed=-3"], ["'seed'", ">= 0"]),
        "negative weight decay": (["weight_decay=-1"], ["'weight_decay'", ">= 0"]),
        "ds_config not found": (["--ds-config", "zero9"], ["ds_config 'zero9' not found"]),
        "ds_config not JSON": (["--ds-config", str(_write(tmp / "ds.json", "{oops"))], ["ds.json", "not valid JSON"]),
        "ds_config disagrees": (["--ds-config", _ds_config(tmp / "ds16.json", train_micro_batch_size_per_gpu=16)],
                                ["ds16.json", "'train_micro_batch_size_per_gpu' is 16", "gives 8"]),
        "ds_config rejected by DeepSpeed": (["--ds-config", _ds_config(tmp / "ds7.json", zero_optimization__stage=7)],
                                            ["ds7.json", "DeepSpeed rejects it", "stage", "got 7"]),
        "missing CSV": ([f"csv_path={tmp / 'none.csv'}"], ["none.csv", "does not exist"]),
        "CSV without class_id": ([f"csv_path={_csv(tmp / 'cols.csv', ['id,label', 's0000000,1'])}"],
                                 ["cols.csv", "missing column(s) ['class_id']"]),
        "class id out of range": ([f"csv_path={_csv(tmp / 'cls.csv', [*csv_lines[:3], 's0000002,x.JPEG,1000,y'])}"],
                                  ["cls.csv:4", "'s0000002'", "class_id 1000", "[0, 1000)"]),
        "duplicate id": ([f"csv_path={_csv(tmp / 'dup.csv', [*csv_lines[:4], csv_lines[2]])}"],
                         ["dup.csv:5", "'s0000001' repeats line 3"]),
        "missing latent cache": ([f"latent_dir={tmp / 'nowhere'}"], ["nowhere", "does not exist"]),
        "not a cache": ([f"latent_dir={tmp / 'not_a_cache'}"], ["not_a_cache", "not an LMDB cache"]),
        "cache without meta": ([f"latent_dir={tmp / 'nometa'}"], ["nometa", "no '__meta__' record"]),
        "token count is not dino_N": (["dino_N=256"], ["dino", "shape is [64, 64], expected [256, 64]", "dino_N"]),
        "layer not in the cache": (["align_layers=mid,dec_first"], ["dino", "layer(s) ['dec_first']"]),
        "missing CLIP table": ([f"clip_embeddings_path={tmp / 'none.pt'}"], ["none.pt", "clip_embeddings_path"]),
        "CLIP table rows": ([f"clip_embeddings_path={_table(tmp / 'rows.pt', (11, 77, 32))}"],
                            ["rows.pt", "11 rows, expected 1001"]),
        "CLIP table width": ([f"clip_embeddings_path={_table(tmp / 'wide.pt', (1001, 77, 16))}"],
                             ["wide.pt", "embedding dim is 16, the U-Net expects 32"]),
        "batch larger than the data": (["batch_size=64"], ["'batch_size'", "64", f"{N} samples"]),
        "missing exclude list": ([f"exclude_ids_path={tmp / 'ids.txt'}"], ["exclude_ids_path", "ids.txt"]),
        "model folder": ([f"model={tmp / 'no_model'}"], ["'model'", "no_model"]),
        "resume without checkpoints": (["--resume", "latest", "--output-dir", str(tmp / "fresh")],
                                       ["--resume latest", "no finished checkpoint"]),
        "resume from a folder without one": (["--resume", str(tmp / "no_ckpt" / "step_00000004")],
                                             ["step_00000004", "holds no DeepSpeed checkpoint"]),
    }


def _write(path, text: str):
    path.write_text(text)
    return path


def test_every_bad_input_stops_with_one_line_naming_it(data, tmp_path, capsys):
    root, paths = data
    for name, (argv, words) in _cases(root, paths, tmp_path).items():
        out = tmp_path / "runs" / name.replace(" ", "_")
        full = ["--config", TINY, "--output-dir", str(out), "--report-to", "none", *_paths_argv(paths), *argv]
        with pytest.raises(SystemExit) as stop:
            train_main(full)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert stop.value.code == 1 and "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("repa-fast-train: "), (name, err)
        for word in words:
            assert word in lines[0], (name, word, lines[0])


def test_a_bug_keeps_its_traceback_and_errors_are_one_line(monkeypatch, capsys):
    def bug():
        raise KeyError("a bug")

    def peer_gone():  # what gloo raises on a rank whose peer process has ended
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:16282. This is typically ...")

    with pytest.raises(KeyError):
        run_main("prog", bug)
    with pytest.raises(RuntimeError):  # one process: no peer to lose, a bug
        run_main("prog", peer_gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stop:
        run_main("prog", peer_gone)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "prog: rank 0: stopped: another rank left the run (Connection closed by " \
                                      "peer); that rank's own line says why\n"
    with pytest.raises(KeyError):
        run_main("prog", bug)
    assert issubclass(InputError, RunError) and issubclass(InputError, ValueError)
    # a DataLoader worker's error arrives with the worker's traceback as text: its last line is the message
    text = ("Caught CacheError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nrepa_fast.data.cache.CacheError: /c: missing record \'k\'\n')
    assert one_line(RunError(text)) == "/c: missing record 'k' (raised in a worker process)"
    assert one_line(RunError("first\n  second")) == "first second"


def test_config_error_on_the_command_line_is_one_line(tmp_path):
    # the console script end to end: exit status, one line, no traceback
    r = subprocess.run([sys.executable, "-m", "repa_fast.train", "--config", TINY, "--output-dir", str(tmp_path),
                        "learning_rate=-1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        "repa-fast-train: configs/tiny.yaml: config key 'learning_rate': must be positive, got -1.0"


# ------------------------------------------------------------------------------ two ranks, one failing

_PORT = [29750]


def _launch(out, paths: dict, *overrides):
    _PORT[0] += 1
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_PORT[0]),
           "--module", "repa_fast.train", "--config", TINY, "--ds-config", "zero2", "--output-dir", str(out),
           "--report-to", "none", *_paths_argv(paths), "batch_size=4", "max_steps=4", *overrides]
    # a hang (a rank left waiting in a collective) fails the test at the timeout
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ.copy())


def _broken_copy(root, tmp_path, cache: str, key_of, value: bytes | None) -> tuple[dict, str]:
    """The caches with one record (of a sample that rank 1 reads in its first batch) truncated or removed."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    ids = read_samples_csv(copy / "train.csv").ids
    sample_id = ids[rank_indices(N, 42, 0, rank=1, world=2)[1]]  # tiny.yaml's seed
    env = lmdb.open(str(copy / cache))
    with env.begin(write=True) as txn:
        if value is None:
            txn.delete(key_of(sample_id).encode())
        else:
            txn.put(key_of(sample_id).encode(), value)
    env.close()
    # the periodic evaluation reads its batch on every rank at the start: a held-out list without the record
    lines = (copy / "train.csv").read_text().splitlines()
    held_out = _csv(copy / "eval.csv", [lines[0], *[ln for ln in lines[1:9] if not ln.startswith(sample_id)]])
    paths = {"csv_path": copy / "train.csv", "latent_dir": copy / "latents", "dino_dir": copy / "dino",
             "clip_embeddings_path": copy / "clip_embeddings.pt", "eval_csv_path": held_out}
    return paths, key_of(sample_id)


def _assert_rank1_failed(r, *words):
    output = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in output, output[-3000:]
    ours = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith("repa-fast-train: ")]
    failing = [line for line in ours if line.startswith("repa-fast-train: rank 1: ")]
    assert len(failing) == 1, r.stderr[-3000:]
    for word in words:
        assert word in failing[0], (word, failing[0])
    # rank 0 either stopped on the lost peer with one line, or was ended by the launcher first
    assert all(line == failing[0] or "rank 0: stopped: another rank left the run" in line for line in ours), ours


@pytest.mark.slow
def test_truncated_record_on_rank_1_stops_both_ranks_with_one_line(data, tmp_path):
    root, _ = data
    paths, key = _broken_copy(root, tmp_path, "latents", lambda i: i, b"\0" * 10)
    r = _launch(tmp_path / "run", paths)
    _assert_rank1_failed(r, "latents", f"record '{key}' has 10 bytes, expected 2048")


@pytest.mark.slow
def test_missing_record_in_a_loader_worker_on_rank_1_is_one_line(data, tmp_path):
    root, _ = data
    paths, key = _broken_copy(root, tmp_path, "dino", lambda i: f"{i}_mid", None)
    r = _launch(tmp_path / "run", paths, "num_workers=1")
    _assert_rank1_failed(r, "dino", f"missing record '{key}'", "(raised in a worker process)")


def test_the_other_entry_points_fail_with_one_line(data, tmp_path, capsys):
    from repa_fast.config import Config
    from repa_fast.evaluate import main as evaluate_main
    from repa_fast.preprocessing.build_dino_cache import main as dino_main
    from repa_fast.preprocessing.sample_subset import main as subset_main

    root, paths = data
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**Config().to_dict(), **paths, "csv_path": str(tmp_path / "x.csv")}))
    cases = [
        (evaluate_main, [str(tmp_path / "nothing")], "repa-fast-evaluate: ", ["nothing", "no config.json"]),
        (evaluate_main, [str(run)], "repa-fast-evaluate: ", ["x.csv", "does not exist"]),
        (subset_main, ["--imagenet-dir", str(tmp_path / "no_images"), "--output-csv", str(tmp_path / "o.csv")],
         "repa-fast-sample-subset: ", ["no_images", "does not exist"]),
        (dino_main, ["--csv-path", str(root / "train.csv"), "--dino", str(tmp_path / "no_dino"), "--output-dir",
                     str(tmp_path / "d"), "--device", "cpu"], "repa-fast-build-dino: ", ["no_dino", "does not exist"]),
    ]
    for main, argv, prog, words in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert stop.value.code == 1 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(prog) and all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("tool", ["sample", "fid", "report"])
def test_a_bug_in_the_evaluation_tools_keeps_its_traceback(tool, tmp_path, monkeypatch, capsys):
    """A RunError ends these tools with one line (tests/test_sample.py, test_fid.py); anything else propagates."""
    from repa_fast import fid, report, sample

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    (tmp_path / "config.json").write_text("{}")
    module, name, argv = {
        "sample": (sample, "Distributed", [str(tmp_path), "--sd", str(tmp_path)]),
        "fid": (fid, "source_kind", [str(tmp_path), str(tmp_path), "--inception", str(tmp_path / "x.pt")]),
        "report": (report, "curves_section", [str(tmp_path)]),
    }[tool]
    monkeypatch.setattr(module, name, bug)
    with pytest.raises(KeyError, match="a bug"):  # Python prints its traceback
        module.main(argv)
    assert capsys.readouterr().err.strip() == ""  # no one-line summary in its place


def test_a_broken_prompts_file_beside_the_clip_table_is_named(tmp_path):
    from repa_fast.data.cache import load_clip_prompts

    table = tmp_path / "clip.pt"
    assert load_clip_prompts(table) is None  # no prompts file: plots label classes by id
    (tmp_path / "clip.pt.json").write_text('{"prompts": ["a photo of a cat"')
    with pytest.raises(RunError, match=r"clip.pt.json: not valid JSON .*repa-fast-prepare-clip"):
        load_clip_prompts(table)
    (tmp_path / "clip.pt.json").write_text('{"prompts": ["a photo of a cat"]}')
    assert load_clip_prompts(table) == ["a photo of a cat"]
