"""The DALI loader yields the torch loader's batches: same ids, latents, tokens and class ids after CFG
dropout, per rank and epoch, the partial last batch included; resumes mid-epoch; names a bad record."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install -e '.[dali]'): "
                    "the DALI loader is optional")

from repa_fast.config import Config  # noqa: E402
from repa_fast.data.dali import DaliLoader, build_dali_loader  # noqa: E402
from repa_fast.data.dataset import SD15AlignedDataset, build_torch_loader  # noqa: E402
from repa_fast.data.loader import TorchLoader, build_loader  # noqa: E402
from repa_fast.data.synthetic import write_synthetic_caches  # noqa: E402

N, BATCH, WORLD = 37, 4, 2  # 19 samples per rank (one wrapped): batches of 4, 4, 4, 4 and 3
LAYERS = ("mid", "enc_last")
NULL_CLASS = 10
SIZES = [4, 4, 4, 4, 3]


def _write(root):
    return write_synthetic_caches(root, num_samples=N, num_classes=5, align_layers=LAYERS,
                                  latent_shape=(4, 8, 8), num_tokens=16, dino_D=32, clip_shape=(1, 8),
                                  table_classes=NULL_CLASS, seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths = _write(tmp_path_factory.mktemp("dali_caches"))
    return SD15AlignedDataset(paths["csv_path"], paths["latent_dir"], paths["dino_dir"], align_layers=LAYERS,
                              cfg_dropout=0.5, seed=7, num_classes=NULL_CLASS)


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [len(b["id"]) for b in got] == [len(b["id"]) for b in want]
    for a, b in zip(got, want, strict=True):
        assert a["id"] == b["id"]
        assert torch.equal(a["index"], b["index"])
        assert a["latent"].dtype == b["latent"].dtype and torch.equal(a["latent"], b["latent"])
        assert a["dino_tokens"].keys() == b["dino_tokens"].keys()
        for layer in LAYERS:
            assert torch.equal(a["dino_tokens"][layer], b["dino_tokens"][layer])
        assert a["class_id"].dtype == torch.int64 and torch.equal(a["class_id"], b["class_id"])


def test_dali_matches_torch_two_ranks_two_epochs(dataset):
    seen, held = {}, {}
    for rank in range(WORLD):
        loader = build_dali_loader(dataset, BATCH, rank, WORLD, epoch=0, num_workers=2)
        try:
            assert len(loader) == len(SIZES)
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                pipe = loader._pipe
                got = held[rank, epoch] = list(loader)
                if epoch == 1:  # the pipeline went on to the next epoch: no rebuild, same workers
                    assert loader._pipe is pipe
                want = list(build_torch_loader(dataset, BATCH, rank, WORLD, epoch))
                assert [len(b["id"]) for b in got] == SIZES
                assert_same_batches(got, want)
                seen[rank, epoch] = torch.cat([b["index"] for b in got])
                classes = torch.cat([b["class_id"] for b in got])
                assert (classes == NULL_CLASS).any() and (classes != NULL_CLASS).any()  # dropout applied
        finally:
            loader.close()
    # Batches stay valid while held: 20 batches went through 6 shared-memory slots per loader since.
    assert_same_batches(held[0, 0], list(build_torch_loader(dataset, BATCH, 0, WORLD, 0)))
    for epoch in (0, 1):  # the two shards cover the dataset; one sample is repeated to even them out
        both = torch.cat([seen[0, epoch], seen[1, epoch]])
        assert sorted(set(both.tolist())) == list(range(N)) and len(both) == N + 1
    assert not torch.equal(seen[0, 0], seen[0, 1])  # reshuffled per epoch


def test_resume_mid_epoch_continues_the_uninterrupted_run(dataset):
    full = build_dali_loader(dataset, BATCH, rank=1, world=WORLD, epoch=1, num_workers=1)
    try:
        uninterrupted = list(full)
        full.set_epoch(2)
        next_epoch = list(full)
    finally:
        full.close()
    for k in (1, 3):
        resumed = build_dali_loader(dataset, BATCH, rank=1, world=WORLD, epoch=1, start=k * BATCH,
                                    num_workers=1)
        try:
            assert len(resumed) == len(SIZES) - k
            assert_same_batches(list(resumed), uninterrupted[k:])
            assert_same_batches(list(build_torch_loader(dataset, BATCH, 1, WORLD, 1, start=k * BATCH)),
                                uninterrupted[k:])
            resumed.set_epoch(2)  # the epoch after a resumed one starts from its beginning
            assert_same_batches(list(resumed), next_epoch)
        finally:
            resumed.close()


def test_unfinished_epoch_restarts_and_drop_last_in_process(dataset):
    # num_workers=0: the callback runs in this process (no DALI workers), as the torch loader's 0.
    loader = build_dali_loader(dataset, BATCH, rank=0, world=WORLD, epoch=3, num_workers=0, drop_last=True)
    try:
        first = next(iter(loader))  # abandoned mid-epoch: the next loop starts epoch 3 again
        got = list(loader)
    finally:
        loader.close()
    want = list(build_torch_loader(dataset, BATCH, 0, WORLD, 3, drop_last=True))
    assert [len(b["id"]) for b in got] == SIZES[:-1] and len(loader) == len(SIZES) - 1
    assert_same_batches(got, want)
    assert_same_batches([first], want[:1])


def test_dtype_cast_and_spawned_workers(dataset):
    # spawn is what a process with CUDA initialised uses; it needs a picklable callback.
    loader = build_dali_loader(dataset, BATCH, rank=0, world=WORLD, epoch=0, num_workers=1,
                               dtype=torch.bfloat16, start_method="spawn")
    try:
        got = list(loader)
    finally:
        loader.close()
    want = list(build_torch_loader(dataset, BATCH, 0, WORLD, 0))
    assert [len(b["id"]) for b in got] == SIZES
    for a, b in zip(got, want, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["class_id"], b["class_id"])
        assert a["latent"].dtype == torch.bfloat16
        assert torch.equal(a["latent"], b["latent"].to(torch.bfloat16))
        for layer in LAYERS:
            assert a["dino_tokens"][layer].dtype == torch.float16  # the target keeps the cache's precision
            assert torch.equal(a["dino_tokens"][layer], b["dino_tokens"][layer])


def test_build_loader_switch_gives_the_same_batches(dataset):
    config = Config(batch_size=BATCH, num_workers=1, prefetch=2, align_layers=list(LAYERS), loader="dali")
    loaders = {kind: build_loader(config, dataset, rank=1, world=WORLD, epoch=5, start=BATCH, loader=kind)
               for kind in ("torch", "dali")}
    try:
        assert isinstance(loaders["torch"], TorchLoader) and isinstance(loaders["dali"], DaliLoader)
        assert isinstance(build_loader(config, dataset, num_workers=0), DaliLoader)  # config.loader
        assert len(loaders["torch"]) == len(loaders["dali"]) == len(SIZES) - 1
        assert_same_batches(list(loaders["dali"]), list(loaders["torch"]))
        for loader in loaders.values():
            loader.set_epoch(6)
        assert_same_batches(list(loaders["dali"]), list(loaders["torch"]))
    finally:
        loaders["dali"].close()


_CORRUPT = textwrap.dedent("""
    import json, sys
    import lmdb
    from repa_fast.data.dataset import SD15AlignedDataset, rank_indices
    from repa_fast.data.dali import build_dali_loader
    from repa_fast.data.synthetic import write_synthetic_caches

    order = rank_indices(37, 7, 0)
    cases = {"truncated": ("dino_dir", f"s{order[21]:07d}_mid"),  # in the 6th batch of 4
             "missing": ("latent_dir", f"s{order[30]:07d}")}  # in the 8th batch
    results = {}
    for case, (cache, key) in cases.items():
        paths = write_synthetic_caches(f"{sys.argv[1]}/{case}", num_samples=37, num_classes=5,
                                       latent_shape=(4, 8, 8), num_tokens=16, dino_D=32, clip_shape=(1, 8),
                                       table_classes=10)
        env = lmdb.open(paths[cache], map_size=1 << 26)
        with env.begin(write=True) as txn:
            if case == "truncated":
                txn.put(key.encode(), b"short")
            else:
                txn.delete(key.encode())
        env.close()
        dataset = SD15AlignedDataset(paths["csv_path"], paths["latent_dir"], paths["dino_dir"], seed=7,
                                     num_classes=10)
        loader = build_dali_loader(dataset, 4, num_workers=2)
        batches = 0
        try:
            for _ in loader:
                batches += 1
            results[case] = {"key": key, "error": None, "batches": batches}
        except Exception as err:
            results[case] = {"key": key, "error": type(err).__name__, "message": str(err), "batches": batches}
        finally:
            loader.close()
    print(json.dumps(results))
""")


def test_corrupt_record_raises_an_error_naming_the_key(tmp_path):
    try:  # in a subprocess, so that a hang fails this test and not the whole run
        proc = subprocess.run([sys.executable, "-c", _CORRUPT, str(tmp_path)], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the DALI loader hung on a corrupt record instead of raising")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    truncated, missing = results["truncated"], results["missing"]
    assert truncated["error"] == "CacheError", truncated
    assert f"record {truncated['key']!r} has 5 bytes, expected" in truncated["message"]
    assert missing["error"] == "CacheError", missing
    assert f"missing record {missing['key']!r}" in missing["message"]
    # raised by the bad batch (the pipeline prefetches 2 ahead), not at the start or after the epoch
    assert 0 < truncated["batches"] < 6 and 0 < missing["batches"] < 8
