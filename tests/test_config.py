import pytest

from repa_fast.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, use_triton

SOURCE_TIER_A = dict(
    csv_path="train_200k.csv", latent_dir="/data/vae_latents", dino_dir="/data/dino_tokens",
    clip_embeddings_path="clip_embeddings_1001.pt", align_layers=["mid"], dino_D=1024, use_lora=True,
    lora_rank=32, lora_targets="attn+conv", prediction="v", path_type="linear", weighting="uniform",
    align_coeff=0.8, manifold_coeff=3.0, manifold_upper_only=False, manifold_mask_diag=False, batch_size=48,
    max_steps=60000, learning_rate=2.0e-4, weight_decay=0.01, ema_decay=0.9995, cfg_dropout=0.1,
    log_interval=100, eval_interval=5000, save_interval=10000, seed=42, mixed_precision="bf16",
    gradient_clip=1.0,
)


def test_tier_a_has_the_source_values():
    cfg = load_config("configs/sd15_repa_A.yaml")
    for key, value in SOURCE_TIER_A.items():
        if key == "path_type":  # what the source means by "linear" on SD-1.5 is its DDPM path (DESIGN.md)
            assert cfg.path_type == "ddpm"
            continue
        assert getattr(cfg, key) == value, key
    assert cfg.dino_N == 256 and cfg.model == "sd15"


def test_tier_b_and_tiny_load():
    b = load_config("configs/sd15_repa_B.yaml")
    assert b.align_layers == ["enc_last", "mid", "dec_first"] and b.max_steps > 60000
    tiny = load_config("configs/tiny.yaml")
    assert tiny.model == "tiny" and tiny.dino_D % 32 == 0


def test_unknown_yaml_key_names_it_and_close_matches(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"learning_rat.*learning_rate") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match="use_lora"):
        config_from_dict({"use_lora": "maybe"})
    with pytest.raises(ConfigError, match="align_layers"):
        config_from_dict({"align_layers": "mid"})
    with pytest.raises(ConfigError, match="max_steps"):
        config_from_dict({"max_steps": 1.5})


def test_bad_choice_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"prediction.*'x0'.*epsilon"):
        config_from_dict({"prediction": "x0"})
    with pytest.raises(ConfigError, match=r"align_layers.*'middle'"):
        config_from_dict({"align_layers": ["middle"]})
    with pytest.raises(ConfigError, match="dino_N"):
        config_from_dict({"dino_N": 200})


def test_overrides_are_typed():
    cfg = load_config("configs/sd15_repa_A.yaml", ["learning_rate=1e-4", "align_layers=mid,enc_last",
                                                   "use_lora=false", "ds_config=none", "batch_size=8"])
    assert cfg.learning_rate == 1e-4 and cfg.align_layers == ["mid", "enc_last"]
    assert cfg.use_lora is False and cfg.ds_config is None and cfg.batch_size == 8
    assert parse_overrides(["align_layers=[mid, dec_first]"])["align_layers"] == ["mid", "dec_first"]
    # YAML reads 1e-4 (no dot) as text; a number field still takes it
    assert config_from_dict({"learning_rate": "3e-4"}).learning_rate == 3e-4


def test_unknown_override_and_malformed():
    with pytest.raises(ConfigError, match=r"manifold_coef.*manifold_coeff"):
        parse_overrides(["manifold_coef=2"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_defaults_are_valid_and_switch():
    cfg = Config()
    assert cfg.lora_scale_alpha == cfg.lora_rank
    assert use_triton("triton", "cpu") and not use_triton("auto", "cpu") and use_triton("auto", "cuda:0")
    assert not use_triton("torch", "cuda")
    with pytest.raises(ConfigError, match="kernels"):
        use_triton("fast", "cpu")


@pytest.mark.parametrize("name", ["sd15_repa_A", "sd15_repa_B"])
def test_shipped_sd15_configs_are_fast_and_one_key_gives_the_reference(name):
    fast = load_config(f"configs/{name}.yaml")
    assert (fast.kernels, fast.loader, fast.compile, fast.ds_config) == ("auto", "auto", "inductor", "zero2")
    assert fast.path_type == "ddpm" and fast.align_warmup_steps == 3000  # SD-1.5's own schedule
    ref = load_config(f"configs/{name}.yaml", ["reference=true"])
    assert (ref.kernels, ref.loader, ref.compile, ref.ds_config) == ("torch", "torch", "none", "zero0")
    assert {k: v for k, v in ref.to_dict().items() if k not in ("kernels", "loader", "compile", "ds_config",
                                                                "reference")} == \
        {k: v for k, v in fast.to_dict().items() if k not in ("kernels", "loader", "compile", "ds_config",
                                                             "reference")}
