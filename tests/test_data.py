import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from repa_fast.data.cache import CacheError, CacheReader, CacheWriter, dino_key, load_clip_table
from repa_fast.data.dataset import (
    SD15AlignedDataset,
    apply_cfg_dropout,
    build_torch_loader,
    epoch_permutation,
    rank_indices,
    read_samples_csv,
    steps_per_epoch,
    uniform_hash,
)
from repa_fast.data.synthetic import main as synthetic_main
from repa_fast.data.synthetic import pool_to_tokens, token_maps, write_synthetic_caches

SHAPES = dict(latent_shape=(4, 8, 8), num_tokens=16, dino_D=32, clip_shape=(77, 8))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return write_synthetic_caches(root, num_samples=37, num_classes=5, align_layers=["mid", "enc_last"],
                                  **SHAPES)


def dataset(caches, **kw):
    return SD15AlignedDataset(caches["csv_path"], caches["latent_dir"], caches["dino_dir"],
                              caches["clip_embeddings_path"], align_layers=kw.pop("layers", ["mid", "enc_last"]),
                              **kw)


def test_cache_round_trip_and_meta(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"k{i}": rng.standard_normal((3, 5)).astype(np.float16) for i in range(4)}
    with CacheWriter(tmp_path / "c", (3, 5), kind="latent", extra_meta={"scaling_factor": 0.18215}) as w:
        for k, a in arrays.items():
            w.put(k, a)
    r = CacheReader(tmp_path / "c", shape=(3, 5), dtype="float16")
    assert len(r) == 4 and r.meta["scaling_factor"] == 0.18215 and sorted(r.keys()) == sorted(arrays)
    for k, a in arrays.items():
        t = r.get(k)
        assert t.dtype == torch.float16 and np.array_equal(t.numpy(), a)
    out = torch.empty(3, 5, dtype=torch.float16)
    assert r.read_into("k1", out) is out and np.array_equal(out.numpy(), arrays["k1"])
    with pytest.raises(CacheError, match=r"holds float16 \[3, 5\], cannot append float16 \[4, 4\]"):
        CacheWriter(tmp_path / "c", (4, 4))  # appending another shape to an existing cache


def test_map_grows_instead_of_failing(tmp_path):
    with CacheWriter(tmp_path / "c", (256, 64), map_size=64 * 1024, commit_every=4) as w:
        for i in range(64):  # 2 MB into a 64 kB map
            w.put(f"k{i}", np.ones((256, 64), np.float16) * i)
    r = CacheReader(tmp_path / "c")
    assert len(r) == 64 and r.get("k63")[0, 0].item() == 63


def test_missing_key_names_file_and_key(caches):
    r = CacheReader(caches["latent_dir"])
    with pytest.raises(CacheError, match=r"latents.*missing record 'nope'"):
        r.get("nope")


def test_truncated_record_names_key(tmp_path):
    with CacheWriter(tmp_path / "c", (4, 4)) as w:
        w.put("good", np.zeros((4, 4), np.float16))
    env = lmdb.open(str(tmp_path / "c"))
    with env.begin(write=True) as txn:
        txn.put(b"short", b"\x00" * 10)
    env.close()
    with pytest.raises(CacheError, match=r"record 'short' has 10 bytes, expected 32"):
        CacheReader(tmp_path / "c").get("short")


def test_wrong_or_missing_meta(tmp_path, caches):
    with pytest.raises(CacheError, match=r"dino.*shape is \[16, 32\], expected \[256, 1024\]"):
        CacheReader(caches["dino_dir"], shape=(256, 1024))
    with pytest.raises(CacheError, match=r"layer\(s\) \['dec_first'\]"):
        CacheReader(caches["dino_dir"], layers=["mid", "dec_first"])
    env = lmdb.open(str(tmp_path / "nometa"))
    with env.begin(write=True) as txn:
        txn.put(b"x", b"1234")
    env.close()
    with pytest.raises(CacheError, match=r"nometa.*no '__meta__'"):
        CacheReader(tmp_path / "nometa")
    env = lmdb.open(str(tmp_path / "badmeta"))
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", json.dumps({"dtype": "float16"}).encode())
    env.close()
    with pytest.raises(CacheError, match=r"badmeta.*bad '__meta__'"):
        CacheReader(tmp_path / "badmeta")
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(tmp_path / "absent")


def test_dataset_sample(caches):
    ds = dataset(caches, cfg_dropout=0.0)
    s = ds[(0, 3)]
    assert s["latent"].shape == (4, 8, 8) and s["latent"].dtype == torch.float16
    assert set(s["dino_tokens"]) == {"mid", "enc_last"} and s["dino_tokens"]["mid"].shape == (16, 32)
    assert s["class_id"] == int(ds.class_ids[3]) and "encoder_hidden_states" not in s
    assert not torch.equal(s["dino_tokens"]["mid"], s["dino_tokens"]["enc_last"])
    with_ehs = dataset(caches, cfg_dropout=0.0, return_encoder_hidden_states=True)[(0, 3)]
    table = load_clip_table(caches["clip_embeddings_path"])
    assert table.shape == (1001, 77, 8)
    assert torch.equal(with_ehs["encoder_hidden_states"], table[with_ehs["class_id"]])
    with pytest.raises(CacheError, match="tokens for layer"):
        dataset(caches, layers=["dec_first"])
    with pytest.raises(CacheError, match=r"shape is \[16, 32\], expected \[256, 1024\]"):
        dataset(caches, token_shape=(256, 1024))


def test_bad_csv_names_file_and_problem(tmp_path, caches):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\na,1\n")
    with pytest.raises(CacheError, match=r"bad.csv: missing column\(s\) \['class_id'\]"):
        dataset({**caches, "csv_path": bad})
    bad.write_text("id,class_id\na,one\n")
    with pytest.raises(CacheError, match=r"bad.csv:2: class_id 'one'"):
        dataset({**caches, "csv_path": bad})
    bad.write_text("id,class_id\na,1000\n")
    with pytest.raises(CacheError, match="outside"):
        dataset({**caches, "csv_path": bad})


def test_cfg_dropout_rate_and_purity():
    idx = np.arange(10_000)
    classes = np.arange(10_000) % 1000
    dropped = apply_cfg_dropout(classes, 42, 0, idx, 0.1, 1000) == 1000
    assert abs(dropped.mean() - 0.10) <= 0.015
    assert np.array_equal(dropped, apply_cfg_dropout(classes, 42, 0, idx, 0.1, 1000) == 1000)
    assert not np.array_equal(dropped, apply_cfg_dropout(classes, 42, 1, idx, 0.1, 1000) == 1000)
    u = uniform_hash(0, 0, idx)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_shuffle_and_shards():
    assert np.array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 2))
    assert not np.array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 3))
    shards = [rank_indices(37, 0, 0, r, 4) for r in range(4)]
    assert {len(s) for s in shards} == {10}  # padded by wrapping: equal steps on every rank
    assert set(np.concatenate(shards)) == set(range(37))
    assert steps_per_epoch(37, 4, world=4) == 3 and steps_per_epoch(37, 4, world=4, drop_last=True) == 2


def collect(caches, workers, epochs=2, **kw):
    ds = dataset(caches, cfg_dropout=0.3)
    out = []
    for epoch in range(epochs):
        for batch in build_torch_loader(ds, batch_size=8, epoch=epoch, num_workers=workers, **kw):
            out.append((batch["id"], batch["class_id"].tolist(), batch["latent"], batch["dino_tokens"]["mid"]))
    return out


def test_loader_identical_with_0_1_4_workers(caches):
    ref = collect(caches, 0)
    assert len(ref) == 2 * 5 and len(ref[-1][0]) == 37 - 32  # partial last batch kept
    assert ref[0][0] != ref[5][0]  # reshuffled per epoch
    for workers in (1, 4):
        got = collect(caches, workers)
        assert len(got) == len(ref)
        for (ids, cls, lat, tok), (ids2, cls2, lat2, tok2) in zip(ref, got, strict=True):
            assert ids == ids2 and cls == cls2 and torch.equal(lat, lat2) and torch.equal(tok, tok2)


def test_loader_resume_mid_epoch(caches):
    full = collect(caches, 0, epochs=1)
    ds = dataset(caches, cfg_dropout=0.3)
    resumed = list(build_torch_loader(ds, batch_size=8, epoch=0, start=16))
    assert [b["id"] for b in resumed] == [f[0] for f in full[2:]]


def test_synthetic_cli(tmp_path, capsys):
    synthetic_main([str(tmp_path / "d"), "--samples", "5", "--classes", "2", "--latent-shape", "4,8,8",
                    "--tokens", "4", "--dim", "32", "--clip-dim", "8", "--layers", "mid,dec_first"])
    assert "latent_dir" in capsys.readouterr().out
    r = CacheReader(tmp_path / "d" / "dino", shape=(4, 32), layers=["mid", "dec_first"])
    assert len(r) == 10


def read_synthetic(paths, layers):
    """(latents [S,C,H,W] fp32, tokens {layer: [S,N,D] fp32}, class ids [S]) in CSV order."""
    samples = read_samples_csv(paths["csv_path"])
    latent_cache, dino_cache = CacheReader(paths["latent_dir"]), CacheReader(paths["dino_dir"])
    latents = torch.stack([latent_cache.get(i).float() for i in samples.ids])
    tokens = {layer: torch.stack([dino_cache.get(dino_key(i, layer)).float() for i in samples.ids]) for layer in layers}
    return latents, tokens, torch.from_numpy(samples.class_ids)


def test_synthetic_tokens_are_the_documented_function_of_latent_and_class(caches):
    import torch.nn.functional as F

    latents, tokens, classes = read_synthetic(caches, ["mid", "enc_last"])
    side = 4  # SHAPES: 16 tokens
    pooled = F.adaptive_avg_pool2d(latents.double(), side).flatten(2).transpose(1, 2)  # [S, N, C], row-major grid
    for li, layer in enumerate(["mid", "enc_last"]):
        proj, class_emb = (torch.from_numpy(a).double() for a in token_maps(5, 4, 32, li, seed=0))
        expected = pooled @ proj + class_emb[classes][:, None, :]
        torch.testing.assert_close(tokens[layer].double(), expected, rtol=2e-3, atol=4e-3)  # stored in fp16
    assert not torch.allclose(tokens["mid"], tokens["enc_last"])  # each layer has its own map
    # pooling onto grids that do not divide the latent: torch's adaptive average pooling
    x = np.random.default_rng(0).standard_normal((3, 10, 7)).astype(np.float32)
    np.testing.assert_allclose(pool_to_tokens(x, 9), F.adaptive_avg_pool2d(torch.from_numpy(x), 3).flatten(1).T.numpy(),
                               rtol=1e-5, atol=1e-6)
    # class structure: a sample's latent is far closer to its class-mates' than to other classes'
    flat = F.normalize((latents - latents.mean(0)).flatten(1), dim=1)
    cos = flat @ flat.T
    same = classes[:, None] == classes[None, :]
    other = torch.eye(len(classes), dtype=torch.bool)
    assert cos[same & ~other].mean() > 0.7 and cos[~same].mean() < 0.2


def test_a_head_learns_the_synthetic_tokens_in_a_few_steps(tmp_path):
    """The data are learnable: a small head on (latent, class) reaches the tokens."""
    import torch.nn.functional as F

    from repa_fast.losses import token_loss
    from repa_fast.models import MLPAlignHead

    K = 3
    paths = write_synthetic_caches(tmp_path, num_samples=24, num_classes=K, latent_shape=(4, 16, 16), num_tokens=64,
                                   dino_D=32, clip_shape=(77, 8), table_classes=K)
    latents, tokens, classes = read_synthetic(paths, ["mid"])
    feat = torch.cat([latents, F.one_hot(classes, K).float()[:, :, None, None].expand(-1, -1, 16, 16)], dim=1)
    torch.manual_seed(0)
    head = MLPAlignHead(4 + K, 32, num_tokens=64, hidden=32)
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: thread pools on shared cores only add waiting
    try:
        for _ in range(40):
            loss = token_loss(head(feat), tokens["mid"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[0] > 0.7 and losses[-1] < 0.15 * losses[0], losses[::8]


def test_build_dataset_from_config_and_a_held_out_csv(tmp_path, caches):
    from repa_fast.config import config_from_dict
    from repa_fast.data.dataset import build_dataset

    held_out = tmp_path / "eval.csv"
    lines = Path(caches["csv_path"]).read_text().splitlines()
    held_out.write_text("\n".join(lines[:1] + lines[-4:]) + "\n")
    config = config_from_dict({**caches, "align_layers": ["mid"], "dino_N": 16,
                               "dino_D": 32, "eval_csv_path": str(held_out)})
    assert len(build_dataset(config)) == 37
    eval_set = build_dataset(config, csv_path=config.eval_csv_path)
    assert eval_set.ids == [line.split(",")[0] for line in lines[-4:]]
    with pytest.raises(CacheError, match=r"shape is \[16, 32\], expected \[256, 1024\]"):
        build_dataset(config_from_dict({**caches, "align_layers": ["mid"]}))
